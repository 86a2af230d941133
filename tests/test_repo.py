"""The README's commands are the ones CI runs."""
import re

from conftest import ROOT


def commands(text):
    return re.findall(r"```sh\n(.*?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    main_job, tests = commands(readme)[:2]
    assert "attngen build variants/*.yaml" in main_job
    test_command = tests.split(" && ", 1)[1]            # after the install step
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
