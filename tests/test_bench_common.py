"""neoxfuse.bench.common: percentiles, CUDA-event timing, the device record, the results file, NVML sampling,
the targets and the kernel suites' shared rows and table."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxfuse.bench.common import (
    Timing,
    add_speedups,
    bandwidth_fields,
    buffer_set_count,
    device_record,
    kernel_table,
    percentile,
    providers_arg,
    time_cuda,
    time_graph,
    write_results,
)
from neoxfuse.bench.targets import target, target_lines
from neoxfuse.errors import InvalidInputError, NoGPUError


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentiles_match_numpy(n):
    samples = (torch.rand(n, dtype=torch.float64) * 1000).tolist()
    for q in (0, 10, 50, 90, 95, 99, 100):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_refuses_nonsense():
    with pytest.raises(InvalidInputError):
        percentile([], 50)
    with pytest.raises(InvalidInputError):
        percentile([1.0], 101)


def test_timing_summarises_samples():
    samples = torch.rand(57, dtype=torch.float64).mul(100).tolist()
    timing = Timing.from_samples(samples)
    assert timing.runs == 57
    assert timing.median_us == timing.p50_us == pytest.approx(float(np.median(samples)))
    assert timing.mean_us == pytest.approx(float(np.mean(samples)))
    assert timing.p50_us <= timing.p90_us <= timing.p95_us <= timing.p99_us <= max(samples)
    assert set(timing.as_dict()) == {"median_us", "p50_us", "p90_us", "p95_us", "p99_us", "mean_us", "runs"}


def _device(name="Test GPU 80GB", sm="90", copy=3012.5):
    return {"name": name, "sm": sm, "copy_GBps": copy}


def test_write_results_follows_the_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXFUSE_COMMIT", "0123abcd" * 5)
    rows = [{"model": "tiny", "backend": "reference", "context": 16, "tpot_ms": 1.5, "floor_ms": 0.2, "match": True}]
    path = write_results("decode", rows, device=_device(), out_dir=tmp_path / "results", extra={"nvml": {"available": False}})
    assert path.parent == tmp_path / "results" and path.suffix == ".json"
    assert re.fullmatch(r"decode-\d{8}T\d{6}Z-test-gpu-80gb", path.stem), path.name
    record = json.loads(path.read_text())
    assert set(record) == {"suite", "commit", "created", "device", "rows", "nvml"}
    assert record["suite"] == "decode"
    assert record["commit"] == "0123abcd" * 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["created"])
    assert record["device"] == _device()
    assert record["rows"] == rows
    assert record["nvml"] == {"available": False}


def test_commit_comes_from_git_or_says_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("NEOXFUSE_COMMIT", raising=False)
    record = json.loads(write_results("layer", [], device=_device(), out_dir=tmp_path).read_text())
    assert record["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", record["commit"])


def test_runs_in_the_same_second_get_their_own_files(tmp_path):
    paths = {write_results("decode", [], device=_device(), out_dir=tmp_path) for _ in range(3)}
    assert len(paths) == 3 and all(path.is_file() for path in paths)


def test_a_run_that_saves_as_it_goes_rewrites_its_own_file(tmp_path):
    first = write_results("decode", [{"context": 16}], device=_device(), out_dir=tmp_path, extra={"complete": False})
    other = write_results("decode", [], device=_device(), out_dir=tmp_path)
    again = write_results("decode", [{"context": 16}, {"context": 64}], device=_device(), out_dir=tmp_path,
                          extra={"complete": True}, path=first)
    assert again == first and sorted(tmp_path.iterdir()) == sorted([first, other])
    record = json.loads(first.read_text())
    assert record["complete"] is True and [row["context"] for row in record["rows"]] == [16, 64]


def test_a_run_killed_while_rewriting_its_file_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    first = write_results("decode", [{"context": 16}], device=_device(), out_dir=tmp_path, extra={"complete": False})
    write_text = Path.write_text

    def killed_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the write never finishes, as under SIGKILL

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_results("decode", [{"context": 16}, {"context": 64}], device=_device(), out_dir=tmp_path, path=first)
    monkeypatch.undo()
    assert [path.name for path in tmp_path.glob("*.json")] == [first.name]
    assert json.loads(first.read_text())["rows"] == [{"context": 16}]


@pytest.mark.parametrize(
    "suite, rows, device, extra, message",
    [
        ("", [], _device(), None, "suite"),
        ("decode", [], {"name": "x", "sm": "90"}, None, "copy_GBps"),
        ("decode", [1, 2], _device(), None, "rows"),
        ("decode", [], _device(), {"rows": []}, "redefine rows"),
    ],
)
def test_write_results_refuses_a_malformed_record(tmp_path, suite, rows, device, extra, message):
    with pytest.raises(InvalidInputError, match=message):
        write_results(suite, rows, device=device, out_dir=tmp_path, extra=extra)
    assert not list(tmp_path.iterdir())


def test_a_cpu_run_has_no_copy_rate():
    record = device_record(None)
    assert record["sm"] is None and record["copy_GBps"] is None and record["name"].startswith("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_machine_cuda_timing_says_why():
    with pytest.raises(NoGPUError):
        time_cuda(lambda: None)
    with pytest.raises(NoGPUError):
        time_graph(lambda i: None, 2)


@pytest.mark.gpu
def test_time_cuda_measures_device_time():
    # torch.cuda._sleep spins the GPU for a number of cycles: twice the cycles, about twice the time.
    short = time_cuda(lambda: torch.cuda._sleep(200_000), warmup=2, runs=20)
    long = time_cuda(lambda: torch.cuda._sleep(400_000), warmup=2, runs=20)
    assert short.runs == long.runs == 20
    assert 1.6 < long.median_us / short.median_us < 2.4
    with pytest.raises(InvalidInputError):
        time_cuda(lambda: None, runs=0)


@pytest.mark.gpu
def test_time_graph_reports_time_per_captured_call():
    # Four sleeps captured in one graph: each replay takes about four single sleeps, reported per call.
    single = time_cuda(lambda: torch.cuda._sleep(200_000), warmup=2, runs=20)
    per_call = time_graph(lambda i: torch.cuda._sleep(200_000), 4, runs=20)
    assert per_call.runs == 20
    assert 0.7 < per_call.median_us / single.median_us < 1.3


@pytest.mark.gpu
def test_device_record_on_a_gpu():
    from neoxfuse.device import copy_bandwidth

    record = device_record(copy_bandwidth(nbytes=64 << 20, iterations=3))
    assert record["name"] and record["sm"].isdigit() and record["copy_GBps"] > 100


# ---- the kernel suites' shared pieces (CPU) ------------------------------------------------------------------


def _kernel_row(shape: str, provider: str, median_us: float, beyond_l2: bool = True) -> dict:
    return {"shape": shape, "provider": provider, "median_us": median_us, "p90_us": median_us * 1.1,
            "p99_us": median_us * 1.2, "GBps": 1000.0, "pct_copy": 33.3, "rel_err": 1e-4, "beyond_l2": beyond_l2}


def test_bandwidth_fields_state_the_rate_and_whether_l2_could_flatter_it():
    timing = Timing.from_samples([2.0, 2.0, 4.0])  # median 2 us
    fields = bandwidth_fields(timing, bytes_moved=6_000_000, sets=10, copy_GBps=4000.0, l2_bytes=50 * 2**20)
    assert fields["GBps"] == pytest.approx(3000.0) and fields["pct_copy"] == pytest.approx(75.0)
    assert {"p50_us", "p90_us", "p95_us", "p99_us"} <= set(fields) and fields["median_us"] == 2.0
    assert fields["buffer_sets"] == 10 and fields["bytes"] == 6_000_000
    assert fields["beyond_l2"] is False  # 60 MB read per replay: less than twice the 52 MB L2
    assert bandwidth_fields(timing, 6_000_000, 18, 4000.0, 50 * 2**20)["beyond_l2"] is True


def test_buffer_set_count_reads_twice_the_l2_within_bounds():
    assert buffer_set_count(10 * 2**20, 50 * 2**20, most=256) == 10
    assert buffer_set_count(11 * 2**20, 50 * 2**20, most=256) == 10  # ceil(100 / 11)
    assert buffer_set_count(1024, 50 * 2**20, most=256) == 256
    assert buffer_set_count(500 * 2**20, 50 * 2**20, most=256) == 2


def test_speedups_compare_neoxfuse_with_the_peers_of_its_own_shape():
    rows = [_kernel_row("a", "neoxfuse", 2.0), _kernel_row("a", "torch", 6.0), _kernel_row("b", "torch", 1.0),
            _kernel_row("b", "neoxfuse", 4.0)]
    add_speedups(rows, lambda row: row["shape"])
    assert rows[0]["speedup_vs_torch"] == pytest.approx(3.0)
    assert rows[3]["speedup_vs_torch"] == pytest.approx(0.25)
    assert not any(key.startswith("speedup") for key in rows[1]) and not any(key.startswith("speedup") for key in rows[2])


def test_kernel_table_shows_each_peer_with_the_speedup_over_it():
    rows = [_kernel_row("1x2560:fp16:final", "neoxfuse", 2.0), _kernel_row("1x2560:fp16:final", "torch", 5.0, beyond_l2=False),
            _kernel_row("odd", "torch", 1.0)]
    add_speedups(rows, lambda row: row["shape"])
    header, rule, own, peer, lonely = kernel_table(rows, lambda row: row["shape"])
    assert header.split()[:2] == ["shape", "provider"] and set(rule) == {"-"}
    assert own.split()[:3] == ["1x2560:fp16:final", "neoxfuse", "2.00"] and own.rstrip().endswith("1.00e-04")
    assert peer.split()[:3] == ["1x2560:fp16:final", "torch", "5.00"]
    assert peer.split()[-6:] == ["1.00e-04", "2.50", "(buffers", "fit", "in", "L2)"]
    assert lonely.split()[:3] == ["odd", "torch", "1.00"] and lonely.rstrip().endswith("1.00e-04")


def test_targets_say_met_not_met_or_not_measured():
    fast = target("median us", "s", 6.0, 8.0, at_most=True)
    slow = target("median us", "s", 9.0, 8.0, at_most=True)
    ratio = target("speedup", "s", 1.19, 1.2)
    missing = target("speedup", "s", None, 1.2)
    assert (fast["met"], slow["met"], ratio["met"], missing["met"]) == (True, False, False, None)
    title, *lines = target_lines("targets (issue 0):", [fast, slow, ratio, missing])
    assert title == "targets (issue 0):"
    assert lines[0].endswith("6.00 (<= 8.0): met") and lines[1].endswith("9.00 (<= 8.0): NOT met")
    assert lines[2].endswith("1.19 (>= 1.2): NOT met") and lines[3].endswith("n/a (>= 1.2): not measured")


def test_providers_arg_takes_a_subset_and_names_the_choices():
    parse = providers_arg(("neoxfuse", "torch"))
    assert parse(" torch, neoxfuse ") == ["torch", "neoxfuse"]
    for bad in ("", "cublas", "torch,cublas"):
        with pytest.raises(argparse.ArgumentTypeError, match="providers are neoxfuse, torch"):
            parse(bad)
