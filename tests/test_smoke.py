"""The simplest end-to-end run through the real CLI."""


def test_minimal_project_runs_every_task(project):
    result = project.run()
    assert result.returncode == 0, result.stderr
    assert sorted(project.successful()) == ["1", "2", "3"]
    assert project.failed() == {}
    assert "running {'x': 2}" in project.log("2")
