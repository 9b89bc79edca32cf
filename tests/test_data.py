"""Data layer: loading, preprocessing, leave-one-out split, sites, text, `fedenc data describe`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.data import DataError, DataSpec, leave_one_out, load, spec_for
from common.partition import dominant_categories, partition_users
from common.text import history_text

runner = CliRunner()


def items_of(data, user_id):
    seq = data.sequences[data.user_ids.index(user_id)]
    return [data.catalogue.item_ids[i] for i in seq]


def ids(data, indices):
    return [data.catalogue.item_ids[i] for i in indices]


# --- toy set: exact answers (see tests/data/toy/README.md) --------------------------


def test_toy_sequences_sorted_stably_and_deduplicated(toy):
    assert toy.name == "csv:interactions.csv"
    assert toy.raw_counts == {"users": 5, "items": 7, "interactions": 27}
    assert toy.user_ids == ("u1", "u10", "u2", "u3")  # u4 (3 items) is below k-core 5
    # Tie at 200 keeps file order (i3 before i2); the later repeat of i1 is dropped.
    assert items_of(toy, "u1") == ["i1", "i3", "i2", "i4", "i5", "i6"]
    # The repeat of i7 at t=9 is dropped.
    assert items_of(toy, "u10") == ["i7", "i6", "i4", "i2", "i3"]
    # i2 at t=50 (later in the file) is the first occurrence in time; i2 at t=300 goes.
    assert items_of(toy, "u2") == ["i2", "i7", "i3", "i5", "i1"]
    # All at the same time: file order.
    assert items_of(toy, "u3") == ["i5", "i4", "i3", "i2", "i1"]
    assert all(s.dtype == np.int64 for s in toy.sequences)


def test_toy_catalogue_keeps_every_item(toy):
    cat = toy.catalogue
    assert cat.item_ids == ("i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8")  # i8 never interacted
    assert len(cat) == 8
    assert cat.texts[0] == "Alpha (2001) | Drama|Comedy"
    assert cat.texts[5] == "Foxtrot (2006)"  # empty genres: no dangling separator
    assert cat.categories[0] == ("Drama", "Comedy")
    assert cat.categories[5] == ()


def test_toy_leave_one_out(toy):
    split = leave_one_out(toy)
    assert [ids(toy, t) for t in split.train] == [
        ["i1", "i3", "i2", "i4"],
        ["i7", "i6", "i4"],
        ["i2", "i7", "i3"],
        ["i5", "i4", "i3"],
    ]
    assert ids(toy, split.valid) == ["i5", "i2", "i5", "i2"]
    assert ids(toy, split.test) == ["i6", "i3", "i1", "i1"]
    assert split.valid.dtype == split.test.dtype == np.int64
    assert split.popularity().tolist() == [1, 2, 3, 3, 1, 1, 2, 0]
    assert split.popularity([0]).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_toy_user_attributes_hold_constant_columns(toy):
    assert list(toy.user_attributes.columns) == ["site"]
    assert toy.user_attributes["site"].tolist() == ["A", "B", "A", "B"]


def test_rating_threshold_applies_before_deduplication(toy_dir):
    data = load(DataSpec(dataset="csv", data_path=str(toy_dir / "interactions.csv"), rating_threshold=5))
    assert data.user_ids == ("u1", "u10", "u3")  # u2 keeps 4 ratings >= 5
    # u10's i7 at t=5 is rated 3, so the repeat at t=9 (rated 6) is the one kept.
    assert items_of(data, "u10") == ["i6", "i4", "i2", "i7", "i3"]


def test_item_template_and_text_columns(toy_dir):
    path = str(toy_dir / "interactions.csv")
    titles = load(DataSpec(dataset="csv", data_path=path, text_columns=("title",)))
    assert titles.catalogue.texts[0] == "Alpha (2001)"
    templated = load(DataSpec(dataset="csv", data_path=path, item_template="{title} [{genres}]"))
    assert templated.catalogue.texts[5] == "Foxtrot (2006) []"


def test_history_text_most_recent_first(toy):
    seq = toy.sequences[0]  # i1 i3 i2 i4 i5 i6
    assert history_text(toy.catalogue, seq, max_items=3) == "Foxtrot (2006); Echo (2005) | Action|Drama; Delta (2004) | Action"
    assert history_text(toy.catalogue, seq[:1], sep=" / ") == "Alpha (2001) | Drama|Comedy"
    assert history_text(toy.catalogue, []) == ""


def test_iso_timestamps_sort_by_time(tmp_path, toy_dir):
    (tmp_path / "items.csv").write_text((toy_dir / "items.csv").read_text())
    rows = ["user_id,item_id,timestamp"] + [
        f"u,i{i},{t}"
        for i, t in [(1, "2020-01-03"), (2, "2020-01-01T10:00:00Z"), (3, "2020-01-02 08:00"), (4, "2019-12-31"),
                     (5, "2020-01-01T10:00:00Z")]
    ]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    data = load(DataSpec(dataset="csv", data_path=str(tmp_path / "x.csv")))
    assert items_of(data, "u") == ["i4", "i2", "i5", "i3", "i1"]


def test_fingerprint_stable_across_processes(toy, toy_dir):
    path = str(toy_dir / "interactions.csv")
    code = f"from common.data import DataSpec, load; print(load(DataSpec('csv', {path!r})).fingerprint([1, 3]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == toy.fingerprint([1, 3])
    assert len(out) == 64
    assert toy.fingerprint() != toy.fingerprint([0, 1, 2])


# --- partitions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("natural", {"column": "site"})],
)
def test_partition_covers_every_user_once_and_is_reproducible(synthetic, kind, kwargs):
    sites = partition_users(synthetic, 5, kind, seed=3, **kwargs)
    assert len(sites) == 5
    everyone = np.concatenate(sites)
    assert sorted(everyone.tolist()) == list(range(len(synthetic.user_ids)))  # each user in exactly one site
    assert all(len(s) > 0 and (np.diff(s) > 0).all() for s in sites)  # non-empty, sorted
    again = partition_users(synthetic, 5, kind, seed=3, **kwargs)
    assert all((a == b).all() for a, b in zip(sites, again, strict=True))


@pytest.mark.parametrize(("kind", "kwargs"), [("iid", {}), ("dirichlet", {"alpha": 0.5})])
def test_partition_seed_matters(synthetic, kind, kwargs):
    one = partition_users(synthetic, 5, kind, seed=0, **kwargs)
    two = partition_users(synthetic, 5, kind, seed=1, **kwargs)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(one, two, strict=True))


def test_natural_partition_groups_whole_values(synthetic):
    sites = partition_users(synthetic, 3, "natural", column="site")  # 7 site values into 3 sites
    values = synthetic.user_attributes["site"].to_numpy()
    held = [set(values[s]) for s in sites]
    assert sorted(v for h in held for v in h) == [f"s{i}" for i in range(7)]  # no value split across sites
    assert max(map(len, sites)) - min(map(len, sites)) <= 50


def test_natural_partition_toy_sites(toy):
    sites = partition_users(toy, 2, "natural", column="site")
    assert [[toy.user_ids[u] for u in s] for s in sites] == [["u1", "u2"], ["u10", "u3"]]


def test_dominant_category(toy):
    # u1: i1 i3 i2 i4 i5 i6 -> Drama 3 (i1 i2 i5), Comedy 2, Action 2
    assert dominant_categories(toy)[0] == "Drama"


# --- bundled and benchmark datasets -----------------------------------------------------


def test_movietweetings_counts():
    data = load(DataSpec())
    assert data.name == "movietweetings"
    assert data.raw_counts == {"users": 16_554, "items": 10_506, "interactions": 100_000}
    # After the default filters (implicit, k-core 5 on users), computed once and fixed here.
    assert len(data.user_ids) == 4_692
    assert len(data.catalogue) == 10_506
    assert sum(len(s) for s in data.sequences) == 80_854
    toy_story = data.catalogue.item_ids.index("0114709")  # ids keep their leading zeros
    assert data.catalogue.texts[toy_story] == "Toy Story (1995) | Animation, Adventure, Comedy, Family, Fantasy"
    assert sum(1 for c in data.catalogue.categories if not c) == 66
    assert data.user_attributes.shape == (4_692, 0)


def test_movielens_100k_counts(ml100k_dir):
    data = load(spec_for(str(ml100k_dir)))
    assert data.name == "movielens-100k"
    assert data.raw_counts == {"users": 943, "items": 1682, "interactions": 100_000}
    assert len(data.user_ids) == 943 and len(data.catalogue) == 1682
    assert data.catalogue.texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert list(data.user_attributes.columns) == ["occupation", "age", "gender"]
    assert data.user_attributes.loc[0].tolist() == ["technician", "18-24", "M"]  # user 1: 24, M, technician
    sites = partition_users(data, 10, "natural", column="occupation")
    assert sum(map(len, sites)) == 943


def test_ml100k_config_with_the_shared_copy(ml100k_dir):
    """configs/ml100k.toml names the folder a user downloads to; tests point it at the shared copy."""
    from pathlib import Path

    from common.config import Settings, load_config_file

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "ml100k.toml")
    assert config["data-path"] == "data/ml-100k"  # inside the project, where its comment says to unzip
    settings = Settings.from_config(config | {"data-path": str(ml100k_dir)})
    data = load(settings.data)
    assert len(data.user_ids) == 943
    sites = partition_users(data, settings.num_sites, settings.split.partition, column=settings.split.partition_column)
    assert len(sites) == 10 and all(len(s) > 0 for s in sites)


# --- bad input: one clear message, non-zero exit ---------------------------------------------


def describe(*args):
    return runner.invoke(app, ["data", "describe", *args])


def assert_fails(result, *fragments):
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message


def test_describe_toy(toy_dir):
    result = describe("--dataset", str(toy_dir / "interactions.csv"), "--sites", "2", "--partition", "natural",
                      "--partition-column", "site")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in ("csv:interactions.csv", "users", "27", "21", "density", "p50", "cold-start", "A", "B"):
        assert fragment in out, out


def test_bad_missing_file(tmp_path):
    assert_fails(describe("--dataset", str(tmp_path / "nope.csv")), "nope.csv", "not found")


def test_bad_missing_items_file(tmp_path, toy_dir):
    (tmp_path / "x.csv").write_text((toy_dir / "interactions.csv").read_text())
    assert_fails(describe("--dataset", str(tmp_path / "x.csv")), "items.csv", "not found")


def test_bad_misnamed_column(tmp_path, toy_dir):
    text = (toy_dir / "interactions.csv").read_text().replace("user_id,", "user,", 1)
    (tmp_path / "x.csv").write_text(text)
    assert_fails(describe("--dataset", str(tmp_path / "x.csv"), "--items", str(toy_dir / "items.csv")),
                 "x.csv", "'user_id'")  # fmt: skip


def test_bad_text_column(toy_dir):
    with pytest.raises(DataError, match="items.csv: no item column 'plot'"):
        load(DataSpec("csv", str(toy_dir / "interactions.csv"), text_columns=("title", "plot")))


def test_bad_timestamp(tmp_path, toy_dir):
    text = (toy_dir / "interactions.csv").read_text().replace("u3,i4,1000", "u3,i4,soon after lunch")
    (tmp_path / "x.csv").write_text(text)
    (tmp_path / "items.csv").write_text((toy_dir / "items.csv").read_text())
    assert_fails(describe("--dataset", str(tmp_path / "x.csv")), "x.csv", "'timestamp'", "'soon after lunch'")


def test_bad_unknown_item_ids(tmp_path, toy_dir):
    text = (toy_dir / "interactions.csv").read_text().replace("u2,i7,", "u2,i99,")
    (tmp_path / "x.csv").write_text(text)
    (tmp_path / "items.csv").write_text((toy_dir / "items.csv").read_text())
    assert_fails(describe("--dataset", str(tmp_path / "x.csv")), "x.csv", "'i99'")


def test_bad_k_core_leaves_no_users(toy_dir):
    assert_fails(describe("--dataset", str(toy_dir / "interactions.csv"), "--k-core", "50"), "k-core 50", "no users")


def test_bad_partition_leaves_site_empty(toy_dir, synthetic):
    assert_fails(describe("--dataset", str(toy_dir / "interactions.csv"), "--sites", "3", "--partition", "natural",
                          "--partition-column", "site"), "'site'", "fewer sites")  # fmt: skip
    assert_fails(describe("--dataset", str(toy_dir / "interactions.csv"), "--sites", "9"), "9 sites", "fewer sites")
    with pytest.raises(DataError, match="fewer sites"):
        partition_users(synthetic, 60, "dirichlet", alpha=0.001)


def test_bad_unknown_dataset_name():
    assert_fails(describe("--dataset", "netflix"), "unknown dataset 'netflix'")
    assert_fails(describe("--dataset", "movielens"), "'movielens' needs a path")
    with pytest.raises(DataError, match="unknown dataset 'netflix'"):
        load(DataSpec(dataset="netflix"))
