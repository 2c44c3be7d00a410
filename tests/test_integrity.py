"""Durable state that cannot lie: damage to a run directory is recovered bit-identically or named.

Every fault is made on a copy of one 8-step digits run (snapshots at 4 and 8, θ hashes recorded at
4 and 8), which is then resumed to 12 steps and compared with an undisturbed 12-step run.
`flops-dist verify` must name each damaged file before the resume repairs it.
"""
import shutil

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from safetensors.numpy import load_file

from flops_dist.api import build_model, load_callable, train
from flops_dist.cli import main as cli
from flops_dist.config import Config
from flops_dist.runlog import row_checksums
from conftest import EXAMPLES


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, digits_dir):
    job = tmp_path_factory.mktemp("integrity") / "digits"
    shutil.copytree(EXAMPLES / "digits", job, ignore=shutil.ignore_patterns("data"))
    shutil.copytree(digits_dir, job / "data")
    return job


def run(job, run_dir, steps, resume=False):
    cfg = Config.load(job / "digits.toml")
    cfg.train.steps, cfg.train.hash_every = steps, 4
    cfg.output.run_dir, cfg.output.snapshot_every, cfg.output.log_every = str(run_dir), 4, 4
    cfg.metrics.port = -1
    lines = []
    train(build_model(cfg), load_callable(cfg.model.loss, "model.loss"), cfg.data.train, cfg,
          progress=lines.append, resume=resume)
    return lines


@pytest.fixture(scope="module")
def undisturbed(job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    run(job, run_dir, 12)
    return load_file(str(run_dir / "model.safetensors")), run_dir


@pytest.fixture(scope="module")
def eight_steps(job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eight") / "run"
    run(job, run_dir, 8)
    return run_dir


def verify(run_dir, capsys):
    code = cli(["verify", str(run_dir)])
    out = capsys.readouterr()
    return code, out.out + out.err


def edit_part(path, column, change):
    """Damage that still parses: one value changed, the stored checksum left as it was."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[1] = change(values[1])
    pq.write_table(table.set_column(table.schema.get_field_index(column), column,
                                    pa.array(values, table.schema.field(column).type)), path)


def flip_snapshot_byte(run_dir):
    path = run_dir / "snapshots" / "step-00000008.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside θ's bytes; the header still parses
    path.write_bytes(bytes(data))
    return path


def edit_coefficient(run_dir):
    path = run_dir / "updates" / "part-00000004-00000007.parquet"
    edit_part(path, "coefficients", lambda c: [c[0] * 1.0001] + c[1:])
    return path


def edit_allocator_state(run_dir):
    path = run_dir / "run_log" / "part-00000004-00000007.parquet"
    edit_part(path, "allocator_state", lambda s: {**s, "beta0": s["beta0"] + 1e-9})
    return path


def truncate_part(run_dir):
    path = run_dir / "updates" / "part-00000004-00000007.parquet"
    path.write_bytes(path.read_bytes()[:200])
    return path


def delete_updates(run_dir):
    shutil.rmtree(run_dir / "updates")
    return run_dir / "updates"


def forge_coefficient(run_dir):
    """An edit that recomputes the row checksums: only the replay against recorded θ hashes sees it.
    Without the step-8 snapshot, resume must replay the forged steps 4-7 from the step-4 one."""
    (run_dir / "snapshots" / "step-00000008.safetensors").unlink()
    path = edit_coefficient(run_dir)
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("checksum"), "checksum",
                                    pa.array(row_checksums(table), pa.string())), path)
    return path


def test_verify_passes_an_undisturbed_run(undisturbed, capsys):
    code, out = verify(undisturbed[1], capsys)
    assert code == 0, out
    assert "12 logged steps" in out and "flops-dist: verify:" not in out


@pytest.mark.parametrize("damage", [flip_snapshot_byte, edit_coefficient, edit_allocator_state, truncate_part,
                                    delete_updates, forge_coefficient])
def test_damage_is_named_by_verify_and_resumed_bit_identically(damage, job, eight_steps, undisturbed, tmp_path,
                                                               capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(eight_steps, run_dir)
    damaged = damage(run_dir)
    code, out = verify(run_dir, capsys)
    assert code == 1 and str(damaged) in out, out
    lines = run(job, run_dir, 12, resume=True)
    if damage is not delete_updates:  # a missing directory is no file to set aside
        assert any(str(damaged) in line for line in lines), lines
    final = load_file(str(run_dir / "model.safetensors"))
    reference = undisturbed[0]
    assert final.keys() == reference.keys() and all((final[k] == reference[k]).all() for k in final)
    code, out = verify(run_dir, capsys)
    assert code == 0, out


def test_a_damaged_final_model_is_named_by_verify(undisturbed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed[1], run_dir)
    model = run_dir / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x10
    model.write_bytes(bytes(data))
    code, out = verify(run_dir, capsys)
    assert code == 1 and f"{model}: its tensors do not match the content hash" in out


def write_three_steps(run_dir, background=False):
    """Three logged steps of real update shape (a seed can exceed 2**53; coefficients span magnitudes)."""
    from flops_dist.runlog import RunLogWriter
    writer = RunLogWriter(run_dir)
    append_three_steps(writer)
    writer.flush(wait=not background)
    writer.wait()
    return run_dir / "updates" / "part-00000000-00000002.parquet"


def append_three_steps(writer):
    from flops_dist.record import StepRecord, record_columns
    from flops_dist.update import UpdateMessage
    rng = np.random.default_rng(0)
    blank = {name: kind() for name, kind in record_columns()}
    for t in range(3):
        scale = 10.0**rng.integers(-8, 8)
        msg = UpdateMessage(t, 0.3, rng.integers(0, 2**61, 50 + t), rng.standard_normal(50 + t) * scale)
        writer.append(StepRecord(**{**blank, "step": t}), msg, np.arange(4), None)


def test_a_segment_written_in_the_background_is_the_one_written_in_place(tmp_path):
    for sub in ("updates", "run_log"):
        in_place = pq.read_table(write_three_steps(tmp_path / "here").parent.parent / sub)
        assert pq.read_table(write_three_steps(tmp_path / "behind", background=True).parent.parent / sub) \
            .equals(in_place)


def test_a_background_write_that_fails_is_raised_by_the_next_flush(tmp_path):
    from flops_dist.runlog import RunLogWriter
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "updates").write_text("a file where the log's folder goes")
    writer = RunLogWriter(run_dir)
    append_three_steps(writer)
    writer.flush(wait=False)  # the write fails in its thread, not here
    with pytest.raises(ValueError, match="updates is a symbolic link or not a directory"):
        writer.flush()


def test_a_list_value_is_in_its_rows_checksum_and_slicing_does_not_move_it(tmp_path):
    table = pq.read_table(write_three_steps(tmp_path / "run"))
    assert row_checksums(table.slice(1)) == row_checksums(table)[1:]
    seeds = table.column("seeds").to_pylist()
    seeds[1][-1] += 1
    changed = table.set_column(table.schema.get_field_index("seeds"), "seeds", pa.array(seeds, pa.list_(pa.int64())))
    before, after = row_checksums(table), row_checksums(changed)
    assert before[0] == after[0] and before[2] == after[2] and before[1] != after[1]


@pytest.mark.parametrize("lists_as_json", [False, True])
def test_a_log_in_either_checksum_format_is_read_and_an_edit_to_it_is_named(tmp_path, lists_as_json):
    """Logs written before list values were hashed carry checksums of the lists printed as JSON."""
    from flops_dist.runlog import scan_log
    path = write_three_steps(tmp_path / "run")
    table = pq.read_table(path)
    sums = row_checksums(table, lists_as_json=lists_as_json)
    assert sums != row_checksums(table, lists_as_json=not lists_as_json)
    column = table.schema.get_field_index("checksum")
    pq.write_table(table.set_column(column, "checksum", pa.array(sums, pa.string())), path)
    read, damage = scan_log(tmp_path / "run", "updates")
    assert read.num_rows == 3 and not damage
    coefficients = table.column("coefficients").to_pylist()
    coefficients[2][7] = float(np.nextafter(coefficients[2][7], np.inf))
    edited = table.set_column(table.schema.get_field_index("coefficients"), "coefficients",
                              pa.array(coefficients, pa.list_(pa.float64())))
    pq.write_table(edited.set_column(column, "checksum", pa.array(sums, pa.string())), path)
    read, damage = scan_log(tmp_path / "run", "updates")
    assert read.num_rows == 0 and "the row of step 2 fails its checksum" in damage[0].why


def test_a_run_log_written_before_a_column_was_added_is_read_with_it_empty_and_an_edit_is_named(tmp_path):
    """A segment is checked over the columns it was written with (test_metric came later)."""
    from flops_dist.runlog import scan_log
    path = write_three_steps(tmp_path / "run").parent.parent / "run_log" / "part-00000000-00000002.parquet"
    older = pq.read_table(path).drop_columns(["test_metric", "checksum"])
    pq.write_table(older.append_column("checksum", pa.array(row_checksums(older), pa.string())), path)
    read, damage = scan_log(tmp_path / "run", "run_log")
    assert read.num_rows == 3 and not damage and read.column("test_metric").null_count == 3
    loss = older.schema.get_field_index("loss")
    edited = older.set_column(loss, "loss", pa.array([0.0, 0.5, 0.0], pa.float64()))
    pq.write_table(edited.append_column("checksum", pa.array(row_checksums(older), pa.string())), path)
    read, damage = scan_log(tmp_path / "run", "run_log")
    assert read.num_rows == 0 and "the row of step 1 fails its checksum" in damage[0].why
