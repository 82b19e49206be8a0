"""Unit tests of threadward.VariableSet: expansion, folders, values, mistakes."""

import itertools
import json
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import threadward
from threadward import ConfigError, VariableSet

MODELS = ["gpt2", "google-bert/bert-base-uncased", "meta-llama/Llama-3.1-8B"]
SEEDS = list(range(0, 9999, 1111))


def seed_example(**test_set_options):
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=MODELS, nicknames=["GPT2", "BERT", "Llama3.1"])
    variable_set.add_variable(name="dataset", values=["HappyGoLucky", "FinalEmotions"],
                              interaction="cartesian")
    options = {"exceptions": {"HappyGoLucky": ["test"]}}
    options.update(test_set_options)
    variable_set.add_variable(name="test_set", values=["dev", "test"], **options)
    variable_set.add_variable(name="seed", values=SEEDS, nicknames=list(range(0, 9, 1)))
    return variable_set


def ids(variable_set):
    return ["/".join(variable_set.folder_names(indices))
            for indices in variable_set.iter_indices()]


def values_of(variable_set):
    return [variable_set.variables_of(indices) for indices in variable_set.iter_indices()]


def entries(variable_set):
    """The "variables" objects of all_tasks.json, parsed back."""
    return [json.loads(variable_set.json_fragment(indices))
            for indices in variable_set.iter_indices()]


def assert_safe_component(name):
    assert isinstance(name, str)
    assert name not in ("", ".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith("-")
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in name), repr(name)
    # IDs are written to UTF-8 text files and folders are created on disk
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise AssertionError("folder name %r cannot be encoded as UTF-8" % (name,))
    assert len(encoded) <= 255, repr(name)
    root = os.path.join(os.sep, "tmp", "root")
    path = os.path.join(root, name)
    assert os.path.dirname(os.path.normpath(path)) == root


def same_typed(a, b):
    return type(a) is type(b) and a == b


# -- the SEED example ----------------------------------------------------------

def test_seed_example_count():
    variable_set = seed_example()
    # 3 models x (HappyGoLucky: test only + FinalEmotions: dev, test) x 9 seeds
    assert len(variable_set) == 3 * 3 * 9 == 81
    assert len(list(variable_set.iter_indices())) == 81


def test_seed_example_order_is_hierarchical():
    expected = []
    for model in ["GPT2", "BERT", "Llama3.1"]:
        for dataset, test_sets in (("HappyGoLucky", ["test"]), ("FinalEmotions", ["dev", "test"])):
            for test_set in test_sets:
                for seed in range(9):
                    expected.append("%s/%s/%s/%d" % (model, dataset, test_set, seed))
    assert ids(seed_example()) == expected
    assert ids(seed_example())[0] == "GPT2/HappyGoLucky/test/0"


def test_seed_example_values_and_nicknames():
    variable_set = seed_example()
    first = values_of(variable_set)[0]
    assert first == {"model": "gpt2", "dataset": "HappyGoLucky", "test_set": "test", "seed": 0}
    last = values_of(variable_set)[-1]
    assert last == {"model": "meta-llama/Llama-3.1-8B", "dataset": "FinalEmotions",
                    "test_set": "test", "seed": 8888}
    seeds = [v["seed"] for v in values_of(variable_set)[:9]]
    assert seeds == SEEDS
    assert all(type(s) is int for s in seeds)
    entry = entries(variable_set)[1]
    assert entry == {"model": {"value": "gpt2", "nickname": "GPT2"},
                     "dataset": {"value": "HappyGoLucky", "nickname": "HappyGoLucky"},
                     "test_set": {"value": "test", "nickname": "test"},
                     "seed": {"value": 1111, "nickname": "1"}}
    assert type(entry["seed"]["value"]) is int
    assert list(entry) == ["model", "dataset", "test_set", "seed"]


def test_expansion_is_repeatable():
    variable_set = seed_example()
    assert list(variable_set.iter_indices()) == list(variable_set.iter_indices())
    assert ids(variable_set) == ids(seed_example())


def test_add_variable_returns_the_set_for_chaining():
    variable_set = VariableSet()
    assert variable_set.add_variable(name="a", values=[1]) is variable_set


# -- exceptions ----------------------------------------------------------------

def test_exception_keyed_by_value_or_nickname_of_a_variable_two_levels_up():
    by_nickname = seed_example(exceptions={"GPT2": ["dev"]})
    by_value = seed_example(exceptions={"gpt2": ["dev"]})
    assert ids(by_nickname) == ids(by_value)
    gpt2 = [i for i in ids(by_value) if i.startswith("GPT2/")]
    assert gpt2 and all(i.split("/")[2] == "dev" for i in gpt2)
    assert len(gpt2) == 2 * 9
    others = [i for i in ids(by_value) if not i.startswith("GPT2/")]
    assert len(others) == 2 * 2 * 2 * 9
    assert len(by_value) == 18 + 72


def test_exception_keyed_by_an_int_value():
    variable_set = VariableSet()
    variable_set.add_variable(name="size", values=[1, 2, 3])
    variable_set.add_variable(name="mode", values=["a", "b"], exceptions={2: ["b"]})
    assert ids(variable_set) == ["1/a", "1/b", "2/b", "3/a", "3/b"]


def test_exceptions_with_several_keys_and_several_listed_values():
    variable_set = VariableSet()
    variable_set.add_variable(name="dataset", values=["HappyGoLucky", "FinalEmotions", "Other"])
    variable_set.add_variable(name="test_set", values=["dev", "test", "val"],
                              exceptions={"HappyGoLucky": ["test", "val"],
                                          "FinalEmotions": ["dev"]})
    assert ids(variable_set) == ["HappyGoLucky/test", "HappyGoLucky/val", "FinalEmotions/dev",
                                 "Other/dev", "Other/test", "Other/val"]


def test_exception_listed_value_keeps_type():
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=["small", "big"])
    variable_set.add_variable(name="batch", values=[8, 16, 32], exceptions={"big": [8]})
    assert values_of(variable_set)[-1] == {"model": "big", "batch": 8}
    assert len(variable_set) == 4


# -- zip -----------------------------------------------------------------------

def test_zip_pairs_by_index():
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=["a", "b", "c"])
    variable_set.add_variable(name="lr", values=[0.1, 0.01, 0.001], interaction="zip")
    variable_set.add_variable(name="seed", values=[0, 1])
    assert [(v["model"], v["lr"], v["seed"]) for v in values_of(variable_set)] == [
        ("a", 0.1, 0), ("a", 0.1, 1), ("b", 0.01, 0), ("b", 0.01, 1),
        ("c", 0.001, 0), ("c", 0.001, 1)]


def test_zip_pairs_with_the_variable_directly_above():
    variable_set = VariableSet()
    variable_set.add_variable(name="group", values=["x", "y"])
    variable_set.add_variable(name="model", values=["a", "b", "c"])
    variable_set.add_variable(name="size", values=[1, 2, 3], interaction="zip")
    variable_set.add_variable(name="tag", values=["p", "q", "r"], interaction="zip")
    assert ids(variable_set) == ["x/a/1/p", "x/b/2/q", "x/c/3/r",
                                 "y/a/1/p", "y/b/2/q", "y/c/3/r"]


def test_zip_under_a_variable_with_exceptions():
    variable_set = VariableSet()
    variable_set.add_variable(name="data", values=["d1", "d2"])
    variable_set.add_variable(name="model", values=["a", "b", "c"], exceptions={"d2": ["c"]})
    variable_set.add_variable(name="size", values=[1, 2, 3], interaction="zip")
    assert ids(variable_set) == ["d1/a/1", "d1/b/2", "d1/c/3", "d2/c/3"]


def test_zip_lengths_must_match():
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=["a", "b", "c"])
    with pytest.raises(ConfigError) as error:
        variable_set.add_variable(name="lr", values=[1, 2], interaction="zip")
    assert "lr" in str(error.value)


def test_zip_on_the_first_variable_is_an_error():
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="lr", values=[1, 2], interaction="zip")
    assert "lr" in str(error.value)


# -- values and nicknames ------------------------------------------------------

def test_json_scalars_keep_their_type():
    values = [1111, 0.5, 1e-05, True, False, None, "text", -3]
    variable_set = VariableSet()
    variable_set.add_variable(name="v", values=values)
    seen = [v["v"] for v in values_of(variable_set)]
    assert len(seen) == len(values)
    assert all(same_typed(a, b) for a, b in zip(seen, values)), seen
    stored = [entry["v"]["value"] for entry in entries(variable_set)]
    assert all(same_typed(a, b) for a, b in zip(stored, values)), stored
    protocol = [json.loads(variable_set.texts(ix, threadward.TASK_VARIABLE)[0])[1]
                for ix in variable_set.iter_indices()]   # what a worker reads
    assert all(same_typed(a, b) for a, b in zip(protocol, values)), protocol


def test_nicknames_default_to_str_of_value():
    values = [1111, 0.5, True, None, "text"]
    variable_set = VariableSet()
    variable_set.add_variable(name="v", values=values)
    assert [e["v"]["nickname"] for e in entries(variable_set)] == [str(v) for v in values]
    assert ids(variable_set) == ["1111", "0.5", "True", "None", "text"]


def test_nicknames_are_strings():
    variable_set = VariableSet()
    variable_set.add_variable(name="seed", values=[0, 1111], nicknames=[0, 1])
    assert [e["seed"]["nickname"] for e in entries(variable_set)] == ["0", "1"]
    assert ids(variable_set) == ["0", "1"]


class Custom:
    def __str__(self):
        return "custom-object"


def test_non_json_values_are_stored_as_strings():
    values = [Custom(), (1, 2), 3 + 4j]
    variable_set = VariableSet()
    variable_set.add_variable(name="v", values=values, nicknames=["c", "t", "z"])
    assert [v["v"] for v in values_of(variable_set)] == ["custom-object", "(1, 2)", "(3+4j)"]
    stored = [e["v"]["value"] for e in entries(variable_set)]
    assert stored == ["custom-object", "(1, 2)", "(3+4j)"]
    assert ids(variable_set) == ["c", "t", "z"]


def test_values_may_be_any_iterable_list_like():
    variable_set = VariableSet()
    variable_set.add_variable(name="a", values=(1, 2))
    variable_set.add_variable(name="b", values=range(3))
    assert len(variable_set) == 6
    assert values_of(variable_set)[-1] == {"a": 2, "b": 2}


# -- unsafe folder names -------------------------------------------------------

def test_hugging_face_id_becomes_one_folder():
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=["meta-llama/Llama-3.1-8B"])
    (folders,) = [variable_set.folder_names(ix) for ix in variable_set.iter_indices()]
    assert len(folders) == 1
    assert_safe_component(folders[0])
    assert "Llama-3.1-8B" in folders[0]
    # the value the task receives is unchanged
    assert values_of(variable_set) == [{"model": "meta-llama/Llama-3.1-8B"}]


UNSAFE = ["..", ".", "", "-rf", "--help", "/etc/passwd", "../../outside", "a/../../b",
          "a\x00b", "line\nbreak", "tab\there", "bell\x07", "del\x7f", "\x1b[31mred",
          "a\\b", "/", "//", "../", "~", " ", "...", "-", "\ud800", "lone\udcffsurrogate"]


@pytest.mark.parametrize("bad", UNSAFE, ids=[repr(u) for u in UNSAFE])
@pytest.mark.parametrize("as_nickname", [False, True], ids=["value", "nickname"])
def test_unsafe_name_is_sanitized_or_rejected(bad, as_nickname):
    variable_set = VariableSet()
    if as_nickname:
        arguments = {"values": ["ok", "v"], "nicknames": ["ok", bad]}
    else:
        arguments = {"values": ["ok", bad]}
    try:
        variable_set.add_variable(name="model_path", **arguments)
    except ConfigError as error:
        assert "model_path" in str(error)
        return
    folders = [variable_set.folder_names(ix)[0] for ix in variable_set.iter_indices()]
    assert len(folders) == 2
    for folder in folders:
        assert_safe_component(folder)
    assert len(set(folders)) == 2


def test_two_values_with_the_same_folder_are_an_error():
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="model", values=["a", "b"], nicknames=["same", "same"])
    assert "model" in str(error.value)


def test_same_value_twice_is_an_error():
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="seed", values=[1, 2, 1])
    assert "seed" in str(error.value)


@pytest.mark.parametrize("pair", [("a/b", "a_b"), ("a/b", "a\\b"), ("-x", "_x"),
                                  ("a\nb", "a_b"), ("1", 1)])
def test_values_that_sanitize_alike_never_share_a_folder(pair):
    variable_set = VariableSet()
    try:
        variable_set.add_variable(name="model", values=list(pair))
    except ConfigError as error:
        assert "model" in str(error)
        return
    folders = [variable_set.folder_names(ix)[0] for ix in variable_set.iter_indices()]
    assert len(set(folders)) == 2


def test_same_folder_names_under_different_variables_are_fine():
    variable_set = VariableSet()
    variable_set.add_variable(name="a", values=["x", "y"])
    variable_set.add_variable(name="b", values=["x", "y"])
    assert ids(variable_set) == ["x/x", "x/y", "y/x", "y/y"]


# -- every configuration mistake in add_variable -------------------------------

def three_level_set():
    variable_set = VariableSet()
    variable_set.add_variable(name="model", values=["a", "b"], nicknames=["A", "B"])
    variable_set.add_variable(name="data", values=["d1", "d2", "d3"])
    return variable_set


MISTAKES = [
    ("bad name with dash", dict(name="my-var", values=[1])),
    ("bad name starting with digit", dict(name="1st", values=[1])),
    ("empty name", dict(name="", values=[1])),
    ("name not a string", dict(name=5, values=[1])),
    ("duplicate name", dict(name="data", values=[1])),
    ("values a string", dict(name="seed", values="abc")),
    ("values an int", dict(name="seed", values=5)),
    ("values None", dict(name="seed", values=None)),
    ("empty values", dict(name="seed", values=[])),
    ("too few nicknames", dict(name="seed", values=[1, 2, 3], nicknames=["x", "y"])),
    ("too many nicknames", dict(name="seed", values=[1], nicknames=["x", "y"])),
    ("unknown interaction", dict(name="seed", values=[1, 2, 3], interaction="product")),
    ("zip length mismatch", dict(name="seed", values=[1, 2], interaction="zip")),
    ("unknown exception key", dict(name="seed", values=[1, 2], exceptions={"nope": [1]})),
    ("listed value not present", dict(name="seed", values=[1, 2], exceptions={"d1": [3]})),
    ("one of two listed values not present",
     dict(name="seed", values=[1, 2], exceptions={"A": [1, 7]})),
    ("exceptions with zip",
     dict(name="seed", values=[1, 2, 3], interaction="zip", exceptions={"d1": [1]})),
    ("exceptions not a dict", dict(name="seed", values=[1, 2], exceptions=[1])),
]


@pytest.mark.parametrize("arguments", [m[1] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_a_config_error_naming_the_variable(arguments):
    variable_set = three_level_set()
    before = ids(variable_set)
    with pytest.raises(ConfigError) as error:
        variable_set.add_variable(**arguments)
    assert isinstance(error.value, threadward.ThreadwardError)
    assert str(arguments["name"]) in str(error.value) if arguments["name"] else True
    # the set is left as it was and still usable
    assert len(variable_set.variables) == 2
    assert ids(variable_set) == before
    variable_set.add_variable(name="fine", values=[0])
    assert len(variable_set) == 6


def test_exception_key_must_be_above_not_below_or_own():
    variable_set = VariableSet()
    variable_set.add_variable(name="a", values=["x", "y"])
    with pytest.raises(ConfigError):
        # "z" is a value of the variable itself, not of one above
        variable_set.add_variable(name="b", values=["z", "w"], exceptions={"z": ["w"]})


# -- hypothesis: random variable sets -----------------------------------------

AWKWARD = ["", ".", "..", "/", "a/b", "../x", "-rf", "-", "a\x00b", "tab\there", "new\nline",
           "\x7f", " ", "\u00e9", "\u65e5\u672c", "a\\b", "~", "a_b", "A", "a", "1", "...",
           "x" * 250, "\ud800"]
scalars = st.one_of(
    st.integers(min_value=-3, max_value=40),
    st.sampled_from(AWKWARD),
    st.text(alphabet="ab_-./\\\x00\n", max_size=3),
    st.booleans(),
    st.none(),
    st.sampled_from([0.5, 1e-05, -2.25]),
)


@st.composite
def variable_specs(draw):
    count = draw(st.integers(min_value=1, max_value=4))
    specs = []
    for depth in range(count):
        interaction = "cartesian"
        if depth and draw(st.integers(0, 3)) == 0:
            interaction = "zip"
        size = len(specs[-1]["values"]) if interaction == "zip" else \
            draw(st.integers(min_value=1, max_value=4))
        values = draw(st.lists(scalars, min_size=size, max_size=size, unique_by=str))
        nicknames = None
        if draw(st.booleans()):
            nicknames = draw(st.lists(st.one_of(st.sampled_from(AWKWARD), st.integers(0, 9),
                                                st.text(alphabet="nN-_/.", max_size=3)),
                                      min_size=size, max_size=size, unique_by=str))
        exceptions = None
        if interaction == "cartesian" and depth and draw(st.booleans()):
            exceptions = {}
            for _ in range(draw(st.integers(1, 2))):
                above = draw(st.sampled_from(specs))
                position = draw(st.integers(0, len(above["values"]) - 1))
                use_nickname = above["nicknames"] is not None and draw(st.booleans())
                key = above["nicknames"][position] if use_nickname else above["values"][position]
                listed = draw(st.lists(st.sampled_from(values), min_size=1, max_size=size,
                                       unique_by=str))
                exceptions[key] = listed
        specs.append({"name": "v%d" % depth, "values": values, "nicknames": nicknames,
                      "interaction": interaction, "exceptions": exceptions})
    return specs


def build(specs):
    """The VariableSet for specs, stopping at the first variable it rejects."""
    variable_set = VariableSet()
    accepted = []
    for spec in specs:
        try:
            variable_set.add_variable(name=spec["name"], values=spec["values"],
                                      nicknames=spec["nicknames"],
                                      interaction=spec["interaction"],
                                      exceptions=spec["exceptions"])
        except ConfigError as error:
            assert spec["name"] in str(error)
            break
        accepted.append(spec)
    return variable_set, accepted


def reference_indices(specs):
    """Independent expansion: filtered cartesian product in hierarchy order."""
    def nick(spec, index):
        nicknames = spec["nicknames"]
        return str(nicknames[index] if nicknames is not None else spec["values"][index])

    def matches(spec, index, key):
        return str(key) in (str(spec["values"][index]), nick(spec, index))

    result = []
    for combo in itertools.product(*[range(len(s["values"])) for s in specs]):
        keep = True
        for depth, spec in enumerate(specs):
            if spec["interaction"] == "zip" and combo[depth] != combo[depth - 1]:
                keep = False
            for key, listed in (spec["exceptions"] or {}).items():
                if any(matches(specs[d], combo[d], key) for d in range(depth)):
                    if not any(matches(spec, combo[depth], item) for item in listed):
                        keep = False
        if keep:
            result.append(combo)
    return result


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(variable_specs())
def test_random_variable_sets(specs):
    variable_set, accepted = build(specs)
    assume(accepted)
    expected = reference_indices(accepted)
    got = list(variable_set.iter_indices())
    assert got == expected
    assert len(variable_set) == len(expected)
    if not any(spec["exceptions"] for spec in accepted):
        product = 1
        for spec in accepted:
            if spec["interaction"] == "cartesian":
                product *= len(spec["values"])
        assert len(got) == product

    # IDs are unique and stable across two independent expansions
    first = ids(variable_set)
    assert len(set(first)) == len(first)
    again, _ = build(accepted)
    assert ids(again) == first
    assert ids(variable_set) == first

    # every folder is inside the root, one safe component per variable
    root = os.path.join(os.sep, "tmp", "threadward-root")
    for indices in got:
        folders = variable_set.folder_names(indices)
        assert len(folders) == len(accepted)
        for folder in folders:
            assert_safe_component(folder)
        path = os.path.join(root, *folders)
        assert os.path.normpath(path) == path
        assert os.path.commonpath([root, os.path.abspath(path)]) == root
        assert os.path.abspath(path) != root

    # values keep their JSON type through all_tasks.json and the task's variables
    for indices in got[:20]:
        parsed = json.loads(variable_set.json_fragment(indices))
        task_values = variable_set.variables_of(indices)
        for spec, index in zip(accepted, indices):
            value = spec["values"][index]
            assert same_typed(parsed[spec["name"]]["value"], value)
            assert same_typed(task_values[spec["name"]], value)
            assert isinstance(parsed[spec["name"]]["nickname"], str)


def test_folders_differing_only_in_case_are_refused_on_a_case_insensitive_filesystem(tmp_path):
    """The check run when the output filesystem ignores case (macOS, some
    mounts); this machine's ext4 does not, so only the check is exercised."""
    variable_set = threadward.VariableSet()
    variable_set.add_variable(name="model", values=["GPT2", "gpt2"])
    with pytest.raises(threadward.ConfigError) as caught:
        threadward._check_case_collisions(variable_set, "variable_iteration.py")
    assert "differ only in case" in str(caught.value)
    assert "'GPT2'" in str(caught.value) and "'gpt2'" in str(caught.value)
    assert threadward._case_insensitive(str(tmp_path)) is False   # ext4 here
    fine = threadward.VariableSet()
    fine.add_variable(name="model", values=["GPT2", "BERT"])
    threadward._check_case_collisions(fine, "variable_iteration.py")


# -- big variables: nothing kept per value that can be made when asked -------

MIXED = [1111, -3, 0.5, 1e-05, True, None, "text", "a/b", "-rf", "tab\there", "\ud800"]


def everything_of(variable_set):
    """Folders, IDs, all_tasks.json entries and task-line variables, per task."""
    return [(variable_set.folder_names(ix), json.loads(variable_set.json_fragment(ix)),
             json.loads("[%s]" % ",".join(variable_set.texts(ix, threadward.TASK_VARIABLE))),
             variable_set.variables_of(ix))
            for ix in variable_set.iter_indices()]


@pytest.mark.parametrize("make", [seed_example, lambda: VariableSet().add_variable(
    name="v", values=MIXED).add_variable(name="w", values=[-1, 0, 1], nicknames=["-", "o", "+"])],
    ids=["seed example", "mixed values"])
def test_a_variable_past_cache_values_gives_what_a_small_one_does(make, monkeypatch):
    small = everything_of(make())
    monkeypatch.setattr(threadward, "CACHE_VALUES", 0)   # every variable "big"
    big = make()
    assert all(v.folders is None and not v.texts for v in big.variables)
    assert everything_of(big) == small
    assert not any(v.texts for v in big.variables)   # nothing was cached on the way


def test_int_values_keep_no_folder_strings(monkeypatch):
    monkeypatch.setattr(threadward, "CACHE_VALUES", 0)
    variable_set = VariableSet().add_variable(name="i", values=[7, -7, 0, 10 ** 199])
    (variable,) = variable_set.variables
    assert variable.nicknames is None and variable.renamed == {1: "_7"}
    assert ids(variable_set) == ["7", "_7", "0", "1" + "0" * 199]
    assert [e["i"]["nickname"] for e in entries(variable_set)] == ["7", "-7", "0", str(10 ** 199)]


def test_int_values_twice_or_too_long_are_still_errors():
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="seed", values=[5, 1, 5])
    assert "values 5 and 5 would share the folder '5'" in str(error.value)
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="seed", values=[1, 10 ** 200])
    assert "no usable folder name" in str(error.value)


def test_a_value_and_a_name_that_make_the_same_folder_name_both_values():
    with pytest.raises(ConfigError) as error:
        VariableSet().add_variable(name="model", values=["x", "a/b", "a_b"])
    assert "values 'a/b' and 'a_b' would share the folder 'a_b'" in str(error.value)
