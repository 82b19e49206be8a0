"""The variables to iterate over; threadward runs one task per combination.

ORDER MATTERS: the first variable is the top of the hierarchy.  A worker that
has loaded a model keeps it and gets that model's remaining tasks first, so
put what is expensive to load (models) first and what is cheap (seeds) last.
"""

import time

# What to do when a task fails:
#   "PRINT_FAILURE_AND_CONTINUE" (default)  print it on the console and go on
#   "SILENT_CONTINUE"                       go on without printing
#   "STOP_EXECUTION"                        hand out no new task; running tasks finish
FAILURE_HANDLING = "PRINT_FAILURE_AND_CONTINUE"

# How task folders (under threadward/task_outputs/) are laid out:
#   "VARIABLE_SUBFOLDER" (default)   GPT2/HappyGoLucky/s0   (one level per variable)
#   "VARIABLE_UNDERSCORE"            GPT2_HappyGoLucky_s0   (one folder per task)
# The folder path is also the task's ID in task_queue/*.txt.
TASK_FOLDER_LOCATION = "VARIABLE_SUBFOLDER"


def setup_variable_set(variable_set):
    # Highest level first.  Values are stored as strings unless they are
    # numbers, booleans or None; nicknames name the folders (default: the value).
    variable_set.add_variable(
        name="model",
        values=["gpt2", "google-bert/bert-base-uncased", "meta-llama/Llama-3.1-8B"],
        nicknames=["GPT2", "BERT", "Llama3.1"])

    # exceptions: for the value (or nickname) of a variable above, the only
    # values this variable takes.  Here BERT is evaluated on HappyGoLucky only.
    variable_set.add_variable(
        name="dataset",
        values=["HappyGoLucky", "FinalEmotions"],
        exceptions={"BERT": ["HappyGoLucky"]})

    # interaction="cartesian" (default): every value under every combination
    # above.  interaction="zip": the i-th value goes with the i-th value of
    # the variable directly above (both lists must be the same length).
    variable_set.add_variable(name="seed", values=[0, 1111, 2222], nicknames=["s0", "s1", "s2"])


def model_to_value(string_value, nickname):
    """NAME_to_value(string_value, nickname): turns a variable's value into
    the object tasks receive.  A worker calls it only when the value changes,
    and releases the previous object first, so keep loading code here."""
    time.sleep(0.5)   # pretend to load a large model
    return {"name": string_value, "nickname": nickname, "loaded_at": time.time()}


def on_task_success(variables, task_folder, log_file):
    """Called in the main process after a task succeeded (keep it quick)."""


def on_task_failure(variables, task_folder, log_file, reason):
    """Called in the main process after a task failed; reason is one line."""
