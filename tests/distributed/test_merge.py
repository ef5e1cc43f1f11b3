"""The exact merge and the shard files: numpy only, no Ray, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from exitguard.distributed import (
    MergeError,
    Shard,
    ShardFileError,
    ShardStore,
    merge_samples,
    merge_table,
)


def per_sample_shards(ids_per_shard, *, rng):
    """Shards whose array ``x`` is a known function of the sample id (so placement is checked)."""
    return [
        Shard(
            f"rank{r}",
            ids,
            {"x": np.asarray(ids, dtype=np.float64) * 10.0, "y": np.stack([ids, ids], axis=1)},
        )
        for r, ids in enumerate(ids_per_shard)
    ]


def test_merge_places_every_sample_by_id_whatever_the_order(rng):
    ids = rng.permutation(50) + 1000  # ids need not be positions
    parts = np.array_split(rng.permutation(ids), 4)
    merged = merge_samples(per_sample_shards(parts, rng=rng), sample_ids=ids)
    np.testing.assert_array_equal(merged["x"], ids * 10.0)
    np.testing.assert_array_equal(merged["y"], np.stack([ids, ids], axis=1))
    assert merged["y"].dtype == np.int64


def test_distributed_sampler_padding_is_refused_as_duplicates(rng):
    """10 samples over 3 ranks: a distributed sampler pads to 12 by repeating samples 0 and 1."""
    padded = np.concatenate([np.arange(10), [0, 1]])
    ranks = [padded[r::3] for r in range(3)]  # [0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]
    with pytest.raises(MergeError) as caught:
        merge_samples(per_sample_shards(ranks, rng=rng), sample_ids=np.arange(10))
    message = str(caught.value)
    assert message.startswith("merge refused: 2 samples appear more than once")
    assert "sample 0 in items rank0, rank1; sample 1 in items rank1, rank2." in message
    np.testing.assert_array_equal(caught.value.duplicates, [[0, 0], [0, 1]])
    assert caught.value.missing.size == 0


def test_holes_and_foreign_ids_are_refused_and_named(rng):
    parts = [np.array([0, 1, 2]), np.array([5, 6, 99])]
    with pytest.raises(MergeError) as caught:
        merge_samples(per_sample_shards(parts, rng=rng), sample_ids=np.arange(7))
    message = str(caught.value)
    assert "not part of the run: item rank1: [99]" in message
    assert "2 samples are missing (a hole biases the risk): sample 3, sample 4." in message
    assert caught.value.unexpected == {"rank1": [99]}
    np.testing.assert_array_equal(caught.value.missing[:, 1], [3, 4])


def test_table_merge_needs_each_row_and_sample_exactly_once(rng):
    k, n = 5, 12
    truth = rng.random((k, n, 3))

    def cell(name, rows, ids):
        return Shard(name, ids, {"v": truth[np.ix_(rows, ids)]}, rows=rows)

    cells = [
        cell(f"g{g}-b{b}", rows, ids)
        for g, rows in enumerate([np.array([0, 1]), np.array([2, 3, 4])])
        for b, ids in enumerate(np.array_split(rng.permutation(n), 3))
    ]
    merged = merge_table(cells, sample_ids=np.arange(n), n_rows=k)
    assert np.array_equal(merged["v"], truth)  # bit for bit

    with pytest.raises(MergeError, match=r"\(row 2, sample \d+\) in items g1-b0, g1-b0"):
        merge_table([*cells, cells[3]], sample_ids=np.arange(n), n_rows=k)
    with pytest.raises(MergeError, match=r"^merge refused: 12 pairs are missing .*\(row 2, sample"):
        merge_table(cells[:3] + cells[4:], sample_ids=np.arange(n), n_rows=k)
    extra_row = Shard("g2-b0", [0, 1], {"v": np.zeros((1, 2, 3))}, rows=[5])
    with pytest.raises(ValueError, match=r"shard 'g2-b0' holds rows \[5\]; rows must be distinct"):
        merge_table([*cells, extra_row], sample_ids=np.arange(n), n_rows=k)


def test_merge_checks_shapes_kinds_and_ids(rng):
    a = Shard("a", [0], {"x": np.zeros((1, 2))})
    with pytest.raises(ValueError, match=r"array 'x' of shard 'b' has trailing shape \(3,\)"):
        merge_samples([a, Shard("b", [1], {"x": np.zeros((1, 3))})], sample_ids=[0, 1])
    with pytest.raises(ValueError, match=r"'b' holds arrays \['z'\]; shard 'a' holds \['x'\]"):
        merge_samples([a, Shard("b", [1], {"z": np.zeros((1, 2))})], sample_ids=[0, 1])
    with pytest.raises(ValueError, match=r"shard 'a' holds per-sample outputs, not table rows"):
        merge_table([a], sample_ids=[0], n_rows=1)
    with pytest.raises(ValueError, match=r"`sample_ids` must be unique; these repeat: \[0\]"):
        merge_samples([a], sample_ids=[0, 0])
    with pytest.raises(ValueError, match=r"leading axes \(b, \.\.\.\) = \(2,\); got shape \(1,\)"):
        Shard("c", [0, 1], {"x": np.zeros(1)})
    with pytest.raises(TypeError, match=r"dtype object; shards hold no pickles"):
        Shard("c", [0], {"x": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match=r"work item id must be 1-100 letters"):
        Shard("../escape", [0], {"x": np.zeros(1)})


def test_shard_files_round_trip_without_pickle(tmp_path, rng):
    shard = Shard(
        "g01-b00002",
        [4, 5],
        {"loss": rng.random((3, 2)), "exits": np.ones((3, 2, 7), dtype=np.int8)},
        rows=[1, 2, 3],
        meta={"seconds": 0.5},
    )
    path = shard.save(tmp_path)
    assert path.name == "g01-b00002.npz"
    with np.load(path, allow_pickle=False) as data:  # a plain npz, readable by numpy alone
        assert sorted(data.files) == ["exits", "loss", "meta", "rows", "sample_ids"]
        assert json.loads(str(data["meta"]))["format"] == "exitguard.shard/1"
    back = Shard.load(path)
    assert back.item == shard.item and back.meta == {"seconds": 0.5}
    np.testing.assert_array_equal(back.rows, [1, 2, 3])
    for name in shard.arrays:
        assert np.array_equal(back.arrays[name], shard.arrays[name])
        assert back.arrays[name].dtype == shard.arrays[name].dtype
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ShardFileError, match=r"bad\.npz is not a readable shard"):
        Shard.load(tmp_path / "bad.npz")


def test_a_shard_folder_belongs_to_one_run(tmp_path):
    store = ShardStore(tmp_path, description={"seed": 1, "n": 4}, items=["b0", "b1"])
    store.write(Shard("b0", [0, 1], {"x": np.zeros(2)}))
    assert ShardStore(tmp_path, description={"n": 4, "seed": 1}).done() == {"b0"}
    with pytest.raises(ShardFileError, match=r"holds another run \(it differs in \['seed'\]\)"):
        ShardStore(tmp_path, description={"seed": 2, "n": 4})
    reader = ShardStore(tmp_path)  # read-only: the recorded description
    assert reader.items == ["b0", "b1"] and reader.run == store.run
    Shard("b1", [2, 3], {"x": np.zeros(2)}, meta={"run": "0123456789abcdef"}).save(tmp_path)
    with pytest.raises(ShardFileError, match=r"b1\.npz belongs to run '0123456789abcdef'"):
        reader.shards()
    assert reader.finished(["b0", "b1"])[0] == {"b0"}


def test_shards_and_merge_import_without_ray_or_torch():
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'torch'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from exitguard.distributed import Shard, merge_samples\n"
        "s = Shard('a', [1, 0], {'x': np.array([1.0, 0.0])})\n"
        "print(merge_samples([s], sample_ids=[0, 1])['x'].tolist())\n"
        "from exitguard.distributed.runner import connect\n"
        "try:\n"
        "    connect()\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[0.0, 1.0]"
    assert 'pip install "exitguard[ray]"' in result.stdout
