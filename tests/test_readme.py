"""The README's map of the file matches the file."""
import re
import subprocess

from conftest import SCRIPT

README = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")


def test_readme_part_table_names_each_part_in_order():
    lines = SCRIPT.read_text(encoding="utf-8").splitlines()
    headers = [m.group(1, 2) for line in lines if (m := re.match(r"# Part ([IVX]+)\. (.+)", line))]
    table = re.findall(r"^\| ([IVX]+)\. ([^|]+?) \|", README, flags=re.M)
    assert table == headers


def test_readme_command_prints_part_one(tmp_path):
    command = "sed -n '/^# Part I\\./,/^# Part II\\./p' self_healing_production_final.py"
    assert command in README
    printed = subprocess.run(command.split(" ", 2)[:2] + [command.split("'")[1], SCRIPT.name], cwd=SCRIPT.parent,
                             capture_output=True, text=True).stdout.splitlines()
    assert printed[0].startswith("# Part I.") and printed[-1].startswith("# Part II.")


def test_readme_quotes_the_slurm_job_files_as_they_are():
    for name in ("bench_array.sbatch", "bench_merge.sbatch"):
        text = (SCRIPT.parent / "tests" / "slurm" / name).read_text(encoding="utf-8")
        assert f"```bash\n{text}```" in README, name
