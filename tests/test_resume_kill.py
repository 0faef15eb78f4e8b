"""Block-wise restores killed with SIGKILL resume to the bytes of an uninterrupted run.

Each run is a real process (``python -c``-style script calling ``blocks.restore_to_ome_zarr``). It is
killed at an exact moment without any hook in the code: one chunk file that the run will read is
replaced by a FIFO, so that the run stops inside that read (frozen, mid-pass) until the test either
hands it the chunk's bytes or kills it. Which pass the run is in is read from the output itself
(markers and record), never guessed from timing.

The window between 'complete' being recorded and the run's scaffolding being removed has no read to
stop in: that state is made directly (the scaffolding put back into a complete output) and resumed.
"""
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import blocks
import zarr_io
from data import downsample_z, make_sample_labels
from model import AttentionResUNet, save_model

pytestmark = pytest.mark.skipif(os.name != "posix", reason="stops runs inside a read with a FIFO (POSIX)")
REPO = Path(__file__).resolve().parents[1]
FACTOR, BLOCK = 4, 32
SHAPE = (33, 96, 96)  # restored (D, H, W): 9 kept slices, 3 x 3 blocks
RUN = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import blocks, zarr_io
from eval import default_settings
from model import load_model

source, output, model_path, mode = sys.argv[2:6]
settings = default_settings()
settings.update(TRAIN_Z_SIZE=3, TRAIN_XY_SIZE=16, INFERENCE_TILE_SIZE=32, INFERENCE_BATCH_SIZE=8, PRECISION="fp32",
                PROBABILITY_THRESHOLD=0.5, DEVICE="cpu", BLOCK_SIZE=32, RESUME=mode == "resume")
summary = blocks.restore_to_ome_zarr(
    zarr_io.open_image(source), output, 4, settings, blocks.OutputMetadata((1.0, 1.0, 1.0), "um", label_name="cells"),
    model=load_model(model_path)[0], labels_source=zarr_io.open_image(source + "/labels/cells"), progress=False)
print(summary["state"], summary["restored"], summary["skipped"])
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The anisotropic input (mask image, ids in labels/cells), a tiny saved model and the script."""
    folder = tmp_path_factory.mktemp("kill")
    ids = downsample_z(make_sample_labels(SHAPE, seed=11), FACTOR)[0]
    layout = zarr_io.create_output(folder / "in.ome.zarr", ids.shape, (4.0, 1.0, 1.0), "um", label_dtype=ids.dtype,
                                   label_name="cells", chunk_xy=32, pyramid=False)
    layout.image.write((slice(None),) * 3, ((ids > 0) * 255).astype(np.uint8))
    layout.labels.write((slice(None),) * 3, ids)
    torch.manual_seed(0)
    save_model(folder / "m.pt", AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval(), {"factor": FACTOR})
    script = folder / "run.py"
    script.write_text(RUN)
    return folder


def command(inputs, output, mode):
    return [sys.executable, str(inputs / "run.py"), str(REPO), str(inputs / "in.ome.zarr"), str(output),
            str(inputs / "m.pt"), mode]


ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def chunk_file(array_dir, coords, missing_ok=False):
    """The file of one chunk of a Zarr v2 array ('/' or '.' separated key); None for a chunk never
    written (all fill value) with ``missing_ok``."""
    for candidate in (Path(array_dir).joinpath(*map(str, coords)), Path(array_dir) / ".".join(map(str, coords))):
        if candidate.is_file():
            return candidate
    if missing_ok:
        return None
    raise FileNotFoundError(f"no chunk {coords} in {array_dir}")


def replace_atomically(path, make):
    """Put ``make(temporary path)`` (a FIFO or a file) at ``path`` in one rename."""
    temporary = path.with_name(path.name + ".swap")
    make(temporary)
    os.replace(temporary, path)


def run_until(inputs, output, mode, chunk, stop, timeout=120):
    """Run the restore with ``chunk`` replaced by a FIFO. At each read of the chunk the run waits inside
    the read: if ``stop()`` then (the run frozen) it is killed with SIGKILL, else it gets the chunk's
    bytes and goes on (a new FIFO is in place before the read ends, so every read is seen). The chunk
    is put back as a file before returning. Returns True when the run was killed."""
    data = chunk.read_bytes()
    replace_atomically(chunk, os.mkfifo)
    log = Path(output).with_name(Path(output).name + f".{mode}.log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command(inputs, output, mode), env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            assert time.monotonic() < deadline, "the run neither finished nor read the chunk"
            try:
                fd = os.open(chunk, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                time.sleep(0.002)
                continue
            try:
                if stop():
                    process.kill()  # SIGKILL, while the run waits inside the read
                    process.wait()
                    return True
                replace_atomically(chunk, os.mkfifo)  # the next read opens a new FIFO
                os.set_blocking(fd, True)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        assert process.wait() == 0, log.read_text()[-3000:]
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        replace_atomically(chunk, lambda path: path.write_bytes(data))


def record(output):
    return zarr.open_group(str(output), mode="r").attrs[zarr_io.RESTORE_ATTRIBUTE]


def markers(output, name):
    return blocks.finished_blocks(str(output), name) if Path(output).exists() else set()


def arrays(output):
    """Every array of a store (all levels, labels): path -> (dtype, shape, bytes); and the root's
    attributes without the run's record."""
    group = zarr.open_group(str(output), mode="r")
    found = {path: (str(node.dtype), node.shape, np.asarray(node[...]).tobytes())
             for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    return found, {k: v for k, v in group.attrs.asdict().items() if k != zarr_io.RESTORE_ATTRIBUTE}


def assert_identical(output, clean):
    got, expected = arrays(output), arrays(clean)
    assert sorted(got[0]) == sorted(expected[0]) and len(got[0]) > 4  # image and labels levels
    for path in expected[0]:
        assert got[0][path] == expected[0][path], path
    assert got[1] == expected[1]
    assert record(output)["state"] == "complete"
    assert not (Path(output) / blocks.PROGRESS_GROUP).exists() and not (Path(output) / blocks.MODEL_FILE).exists()
    assert not [p for p in Path(output).parent.iterdir() if p.name.startswith(f".{Path(output).name}.")]


@pytest.fixture(scope="module")
def clean(inputs):
    """The output of an uninterrupted run (named as the tests' outputs: the name is in its metadata)."""
    output = inputs / "clean" / "out.ome.zarr"
    done = subprocess.run(command(inputs, output, "new"), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return output


def test_runs_killed_in_each_pass_resume_to_identical_bytes(inputs, clean, tmp_path):
    n_blocks = 9
    out = tmp_path / "out.ome.zarr"
    source = inputs / "in.ome.zarr"

    # 1. During the blocks: the mask's middle chunk (every block reads it) after three finished blocks.
    assert run_until(inputs, out, "new", chunk_file(source / "s0", (0, 1, 1)),
                     lambda: len(markers(out, "restore")) >= 3), "the run ended without being stopped"
    assert 3 <= len(markers(out, "restore")) < n_blocks and not markers(out, "labels")
    assert record(out)["state"] == "running"

    # 2. During the label ids (the ids are read by that pass only), after two labelled blocks.
    assert run_until(inputs, out, "resume", chunk_file(source / "labels" / "cells" / "s0", (0, 1, 1)),
                     lambda: len(markers(out, "labels")) >= 2), "the run ended without being stopped"
    assert len(markers(out, "restore")) == n_blocks and 2 <= len(markers(out, "labels")) < n_blocks

    # 3. During the pyramid: an output chunk of ids that only the pyramid of the ids reads, after the
    # image's levels are recorded.
    ids = out / "labels" / "cells" / "s0"
    id_chunk = next(c for c in (chunk_file(ids, (0,) + divmod(i, 3), missing_ok=True)
                                for i in sorted(markers(out, "labels"))) if c)  # a labelled block with ids
    assert run_until(inputs, out, "resume", id_chunk, lambda: True), "the run ended without being stopped"
    state = record(out)
    assert state["state"] == "running" and len(markers(out, "labels")) == n_blocks
    assert state["pyramid_levels_done"].get("image", 0) >= 1 and "labels" not in state["pyramid_levels_done"]

    # 4. The last resume completes: the bytes of the uninterrupted run, every array, every level.
    done = subprocess.run(command(inputs, out, "resume"), env=ENV, capture_output=True)
    assert done.returncode == 0 and done.stdout.split()[0] == b"complete", done.stderr.decode()[-3000:]
    assert_identical(out, clean)


def test_complete_output_with_its_scaffolding_left_is_complete(inputs, clean, tmp_path):
    """Killed after 'complete' was recorded, before or while its scaffolding was removed: the state is
    made directly from a finished run (markers, model file, a half-removed markers group aside)."""
    out = tmp_path / "out.ome.zarr"
    shutil.copytree(clean, out)
    blocks.create_markers(str(out), "restore", 9)
    for index in range(9):
        blocks.mark_finished(str(out), "restore", index)
    (out / blocks.MODEL_FILE).write_bytes((inputs / "m.pt").read_bytes())
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".out.ome.zarr.{dead.pid}.x1.removing"  # a removal cut short by the kill
    (aside / blocks.PROGRESS_GROUP).mkdir(parents=True)

    # Complete and readable as it is.
    assert record(out)["state"] == "complete"
    image = zarr_io.open_image(out)
    assert image.read().tobytes() == zarr_io.open_image(clean).read().tobytes()
    # A resume says so, finishes the removal and changes no byte.
    done = subprocess.run(command(inputs, out, "resume"), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"already complete" in done.stdout and done.stdout.split()[-3:] == [b"complete", b"0", b"9"]
    assert_identical(out, clean)
