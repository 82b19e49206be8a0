"""The README's results recipe, as written, with the real pandas, on a real
scikit-learn sweep that has a failure and a task that returns its scores."""

import os
import re

import pytest

from conftest import ROOT

pandas = pytest.importorskip("pandas", reason="`make test-ml` installs pandas")
pytest.importorskip("sklearn", reason="`make test-ml` installs scikit-learn")


def readme_recipe():
    with open(os.path.join(ROOT, "README.md")) as stream:
        readme = stream.read()
    block = re.search(r"```python\n(import pandas, threadward\n.*?)```", readme, re.S)
    assert block, "the README has no pandas recipe"
    return block.group(1)


def test_the_readmes_pandas_recipe_gives_one_table_of_the_sweep(project):
    project.write(resources="NUM_WORKERS = 2\n", variables="""
def setup_variable_set(variable_set):
    variable_set.add_variable(name="C", values=[0.1, 1.0, -1.0])
    variable_set.add_variable(name="seed", values=[0, 1])
""", task="""
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

def task_method(variables, task_folder, log_file):
    X, y = make_classification(n_samples=200, random_state=variables["seed"])
    scores = cross_val_score(LogisticRegression(C=variables["C"]), X, y, cv=3)
    return {"accuracy": float(scores.mean()), "folds": len(scores)}
""")
    result = project.run(timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr   # C = -1 is refused
    namespace = {}
    exec(readme_recipe().replace("YOUR_DIRECTORY", project.dir), namespace)
    frame = namespace["frame"]
    # (a folder name does not start with "-": "_1.0")
    assert list(frame["task_id"]) == ["0.1/0", "0.1/1", "1.0/0", "1.0/1", "_1.0/0", "_1.0/1"]
    assert list(frame.columns[:7]) == ["task_id", "status", "reason", "seconds", "attempts",
                                       "C", "seed"]
    succeeded = frame[frame["status"] == "succeeded"]
    assert len(succeeded) == 4 and (succeeded["accuracy"] > 0.5).all()
    assert (succeeded["folds"] == 3).all()
    failed = frame[frame["status"] == "failed"]
    assert list(failed["C"]) == [-1.0, -1.0]
    assert failed["reason"].str.startswith("ValueError: All the 3 fits failed").all()
    assert (frame["attempts"] == 1).all()
