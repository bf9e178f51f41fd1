"""Class names from users' datasets: refused at load only when no tool can carry them (empty, NUL, repeated, not
text), listed in one error; every other name maps to one safe, unique folder name, always the same."""
import pytest

from engine.config import load_config
from engine.data import DatasetError, load_dataset
from engine.data.classnames import MAX_FOLDER_BYTES, folder_names, safe_folder
from engine.testing.parquet import class_label_parquet

# Fashion-MNIST's real first class, a name that climbs out of its folder, a plain one
FASHION = ["T-shirt/top", "../../escaped", "plain"]


def parquet_config(root):
    return load_config(None, ["dataset.source=parquet", f"dataset.uri={root}", "dataset.metaclass=garment"])


def test_names_with_slashes_dots_and_hundreds_of_characters_load(tmp_path):
    names = [*FASHION, "x" * 400]
    class_label_parquet(tmp_path / "ds" / "train.parquet", names)
    assert load_dataset(parquet_config(tmp_path / "ds")).class_names == names


@pytest.mark.parametrize("bad, why", [("", "empty"), ("   ", "empty"), ("bag\x00", "holds a NUL character"),
                                      ("plain", "appears more than once")])
def test_unusable_names_are_refused_at_load_and_listed(tmp_path, bad, why):
    class_label_parquet(tmp_path / "ds" / "train.parquet", [*FASHION, bad])
    with pytest.raises(DatasetError, match=r"unusable class names: ") as err:
        load_dataset(parquet_config(tmp_path / "ds"))
    assert f"{bad!r} ({why})" in str(err.value) and "\n" not in str(err.value)


def test_every_unusable_name_in_one_error(tmp_path):
    class_label_parquet(tmp_path / "ds" / "train.parquet", ["ok", "", "a\x00b", "ok"])
    with pytest.raises(DatasetError) as err:
        load_dataset(parquet_config(tmp_path / "ds"))
    assert all(s in str(err.value) for s in ("'' (empty)", "'a\\x00b' (holds a NUL", "'ok' (appears more than once)"))


def test_folder_names_are_safe_unique_and_stable():
    names = [*FASHION, "Plain", "T-shirt_top", ".hidden", "..", "é" * 300, "a:b*c?", "001.Black_footed_Albatross"]
    folders = folder_names(names)
    assert folders == folder_names(list(names))                      # a pure function of the names
    assert len({f.casefold() for f in folders}) == len(names)        # one folder per class, also ignoring case
    for f in folders:
        assert "/" not in f and "\\" not in f and not f.startswith(".") and f not in ("", ".", "..")
        assert len(f.encode()) <= MAX_FOLDER_BYTES and not set(f) & set(':*?"<>|[]')
    by_name = dict(zip(names, folders))
    assert by_name["001.Black_footed_Albatross"] == "001.Black_footed_Albatross"   # safe names stay as they are
    assert by_name["../../escaped"] == "___.._escaped" and safe_folder("..") == "__"
    # "T-shirt/top" and a real "T-shirt_top" would share a folder (so would "plain" and "Plain"): each gets its hash
    assert by_name["T-shirt/top"].startswith("T-shirt_top-") and by_name["T-shirt_top"].startswith("T-shirt_top-")
    assert by_name["plain"] != by_name["Plain"] and folder_names(FASHION) == ["T-shirt_top", "___.._escaped", "plain"]
