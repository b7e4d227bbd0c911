"""The README's map of the file matches the file."""
import re

from conftest import SCRIPT

README = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
ROMAN = ("I", "II", "III", "IV", "V", "VI")


def _part_ranges():
    """Part number -> (first line, last non-blank line), 1-based, from the '# Part N.' headers."""
    lines = SCRIPT.read_text(encoding="utf-8").splitlines()
    starts = [(m.group(1), k + 1) for k, line in enumerate(lines) if (m := re.match(r"# Part ([IVX]+)\. ", line))]
    ranges = {}
    for (name, first), nxt in zip(starts, [s for _, s in starts[1:]] + [len(lines) + 1]):
        last = nxt - 1
        while not lines[last - 1].strip():
            last -= 1
        ranges[name] = (first, last)
    return ranges


def test_the_file_has_six_parts_in_order():
    assert list(_part_ranges()) == list(ROMAN)


def test_readme_part_table_gives_each_parts_lines():
    ranges = _part_ranges()
    table = dict(re.findall(r"^\| ([IVX]+)\. [^|]+\| (\d+-\d+) \|", README, flags=re.M))
    assert table == {name: f"{a}-{b}" for name, (a, b) in ranges.items()}


def test_readme_command_prints_part_one_and_counts_its_lines():
    first, last = _part_ranges()["I"]
    assert f"sed -n {first},{last}p self_healing_production_final.py" in README
    assert f"Part I ({last - first + 1} lines)" in README
    about = int(re.search(r"Part I of the script \(about (\d+) lines", README)[1])
    assert abs(about - (last - first + 1)) <= 10, "the introduction's rounded length"


def test_readme_quotes_the_slurm_job_files_as_they_are():
    for name in ("bench_array.sbatch", "bench_merge.sbatch"):
        text = (SCRIPT.parent / "tests" / "slurm" / name).read_text(encoding="utf-8")
        assert f"```bash\n{text}```" in README, name
