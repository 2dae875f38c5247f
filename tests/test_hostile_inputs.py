"""Hostile and broken inputs, fuzzed (hypothesis): run configurations and sweep files of wrong types, huge numbers,
deep nesting, non-UTF-8 bytes, YAML anchors and tags, `!!python/object`, and truncated or corrupted data set files.
Each is either a valid configuration or a one-line error (a usage error, exit 2, at the command line): never a
traceback, never code execution."""

import io
import os
import tarfile
import tempfile

import click
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from itconv_fast.cli.app import main
from itconv_fast.cli.train import resolve_train_config
from itconv_fast.data import datasets, vision
from itconv_fast.experiments import sweep as sweeps
from itconv_fast.experiments.config import FIELDS, TrainConfig

# derandomize: CI replays the same examples every run (a new failure is found here, not by chance in CI).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e999", "-inf", ".nan", "quick", "paper", "digitclutter", "operator", "0x10"]),
)
keys = st.one_of(
    st.sampled_from(FIELDS + ("objectives", "grid", "base", "indices", "preset")),
    st.text(max_size=8),
    st.integers(-3, 3),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
# What the payloads would create: one name for every pytest-xdist worker (they must collect the same test ids),
# and the tests that use it on one worker (the vacuity check creates it).
MARKER = os.path.join(
    tempfile.gettempdir(), f"itconv-fast-marker-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"
)
pytestmark = pytest.mark.xdist_group("hostile-marker")
HOSTILE = [
    b"width: !!python/object/apply:os.system ['touch " + MARKER.encode() + b"']\n",
    b"!!python/object/new:os.system [touch " + MARKER.encode() + b"]\n",
    b"lam: !!python/name:os.system\n",
    b"a: &x [1, 2]\nwidth: *x\n",
    b"base: &b {width: 4}\ngrid: {lam: [0]}\nindices: *b\n",
    b"width: \xff\xfe\x00bad\n",
    b"\x89PNG\r\n\x1a\n\x00\x00",
    b"[" * 5000 + b"]" * 5000,
    b"width: " + b"9" * 5000 + b"\n",
    b"lam: 1e999\n",
    b"objectives: {fixed-point: 1e999}\n",
    b"objectives: [fixed-point]\n",
    b"grid: {lam: [0, 0.5]}\n",
    b"? [a, b]\n: 1\n",
    b"width: 4\nwidth: 8\n",
    b"",
    b"---\n---\n",
    b"- 1\n- 2\n",
]


def _one_line(message: str) -> bool:
    return message.strip() != "" and "\n" not in message.strip() and "Traceback" not in message


def _check_config_file(path, tmp_path):
    try:
        config = resolve_train_config(str(path), None, {})
    except click.BadParameter as exc:
        assert _one_line(exc.format_message()), exc.format_message()
    else:
        assert isinstance(config, TrainConfig)
    assert not os.path.exists(MARKER)


def _check_sweep_file(path, tmp_path):
    try:
        spec = sweeps.load_sweep(str(path))
    except sweeps.SweepError as exc:
        assert _one_line(str(exc)), str(exc)
    else:
        assert sweeps.expand(spec)
    assert not os.path.exists(MARKER)


@FUZZ
@given(document=values)
def test_fuzzed_config_files_are_a_config_or_a_one_line_error(tmp_path, document):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    _check_config_file(path, tmp_path)


@FUZZ
@given(document=values)
def test_fuzzed_sweep_files_are_a_sweep_or_a_one_line_error(tmp_path, document):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    _check_sweep_file(path, tmp_path)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.sampled_from(HOSTILE)))
def test_fuzzed_bytes_as_config_and_sweep_files(tmp_path, raw):
    path = tmp_path / "file.yaml"
    path.write_bytes(raw)
    _check_config_file(path, tmp_path)
    _check_sweep_file(path, tmp_path)


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_files_at_the_command_line_are_usage_errors(tmp_path, raw):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(raw)
    out = tmp_path / "run"
    train = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            str(path),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--train-size",
            "32",
            "--test-size",
            "16",
            "--width",
            "2",
            "--blocks",
            "1",
        ],
    )
    results = [train]
    try:
        sweeps.load_sweep(str(path))
    except sweeps.SweepError:  # only refused files go through the CLI here: a valid one would run a sweep
        results.append(CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "sweep")]))
    for result in results:
        if result.exit_code != 0:  # a few hostile files are valid (anchors, duplicates, an empty file)
            assert result.exit_code == 2, result.output
            assert (
                "Traceback" not in result.output
                and result.exception is None
                or isinstance(result.exception, SystemExit)
            )
            assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not os.path.exists(MARKER)
    assert not (tmp_path / "sweep" / "trials").exists()


# ---------------------------------------------------------------------------------------------------------
# Data set files, truncated and corrupted


def _mutations():
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 0.999)),
        st.tuples(st.just("flip"), st.floats(0, 0.999), st.integers(1, 255)),
    )


def _mutate(raw: bytes, mutation) -> bytes:
    if mutation[0] == "truncate":
        return raw[: int(len(raw) * mutation[1])]
    at = int(len(raw) * mutation[1])
    return raw[:at] + bytes([raw[at] ^ mutation[2]]) + raw[at + 1 :]


@pytest.fixture(scope="module")
def digitclutter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dc") / "set.npz"
    images, labels = datasets.digitclutter_set(8, 3, 0, cache_dir=None)
    datasets.save_digitclutter(str(path), images, labels, {"n": 8})
    return path.read_bytes(), images, labels


@FUZZ
@given(mutation=_mutations())
@example(mutation=("flip", 0.015625, 91))  # an unclosed brace in the images' .npy header: tokenize.TokenError
def test_corrupted_digitclutter_files_are_refused_or_exact(tmp_path, digitclutter_file, mutation):
    raw, images, labels = digitclutter_file
    path = tmp_path / "set.npz"
    path.write_bytes(_mutate(raw, mutation))
    try:
        got_images, got_labels = datasets.read_digitclutter(str(path))
    except vision.DatasetFilesError as exc:
        assert _one_line(str(exc)) and str(path) in str(exc)
    else:  # a change the format does not read (zip padding, a comment): the data are exactly the same
        assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@FUZZ
@given(mutation=_mutations(), which=st.sampled_from(["images", "labels"]), gz=st.booleans())
def test_corrupted_mnist_files_are_refused_or_read(tmp_path, mutation, which, gz):
    import gzip
    import shutil

    rng = np.random.default_rng(0)
    files = {"images": _idx(rng.integers(0, 256, (6, 28, 28))), "labels": _idx(rng.integers(0, 10, (6,)))}
    if gz:
        files = {k: gzip.compress(v) for k, v in files.items()}
    files[which] = _mutate(files[which], mutation)
    folder = tmp_path / "MNIST" / "raw"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(files["images"])
    (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(files["labels"])
    try:
        images, labels = vision.load_mnist(str(tmp_path), train=False)
    except vision.DatasetFilesError as exc:
        assert _one_line(str(exc))
    else:
        assert images.shape[0] == labels.shape[0] and int(labels.max()) <= 9


@FUZZ
@given(mutation=_mutations())
def test_corrupted_cifar_archives_are_refused_or_read(tmp_path, mutation):
    import pickle

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = pickle.dumps(
                {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))},
                protocol=2,
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(batch)
            tar.addfile(info, io.BytesIO(batch))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_mutate(buffer.getvalue(), mutation))
    try:
        images, labels = vision.load_cifar("cifar10", str(tmp_path), train=False)
    except vision.DatasetFilesError as exc:
        assert _one_line(str(exc))
    else:
        assert images.shape[0] == labels.shape[0] == 4


def test_marker_file_check_is_not_vacuous():
    """An unsafe loader would run the payload: the marker checks above can fail."""
    try:
        yaml.unsafe_load(HOSTILE[1])
        assert os.path.exists(MARKER)
    finally:
        if os.path.exists(MARKER):
            os.remove(MARKER)
