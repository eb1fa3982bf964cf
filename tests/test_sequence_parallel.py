"""Sequence parallelism on the CPU (gloo): several processes make one output, equal to one process's.

The tiny model here has 6 heads and an image of 36 tokens, padded by the model to 64, so that degree 3
needs padding of its own (64 -> 66 image tokens, 64 -> 66 caption rows): the masked-padding path is
exercised as well as the padding-free one of degree 2. Degree 4 does not divide the 6 heads: they are
padded with zero heads to 8 (the fourth rank attends with zero heads only), as Z-Image's 30 heads are
padded to 32 on 4 or 8 GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from zimage_trt.model.denoiser import StaticZImageDenoiser
from zimage_trt.parallel import (SequenceParallelError, SequenceShardedDenoiser, check_degree, join, padded_heads,
                                 shard_engine, valid_degrees)
from zimage_trt.testing.tiny import _randomize_, make_tiny_components, save_tiny_pipeline, tiny_transformer_config

ROOT = Path(__file__).resolve().parents[1]
HEADS = 6
TOLERANCE = 1e-5  # fp32; the sharded path sums attention over the same keys in another order


def six_head_transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    config = {**tiny_transformer_config(), "n_heads": HEADS, "n_kv_heads": HEADS, "dim": 32 * HEADS}
    with torch.random.fork_rng(devices=[]):
        transformer = ZImageTransformer2DModel(**config)
    _randomize_(transformer, torch.Generator().manual_seed(seed))
    return transformer.eval()


def six_head_components(seed: int = 0) -> dict:
    parts = make_tiny_components(seed=seed)
    parts["transformer"] = six_head_transformer(seed)
    return parts


def denoiser_inputs(batch: int = 2, side: int = 12, capacity: int = 64):
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(batch, 16, side, side, generator=gen)
    timestep = torch.rand(batch, generator=gen)
    feats = torch.randn(batch, capacity, 32, generator=gen)
    lens = torch.tensor([capacity - 3, 20][:batch])
    return latents, timestep, feats, lens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn(fn, world: int, *args) -> None:
    # fork: the ranks inherit the imported diffusers (importing it afresh takes longer than the test).
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="fork")


# -- the sharded denoiser ------------------------------------------------------------------------------
def _denoiser_parity(rank, world, port, transformer, compiled):
    as_torchrun_rank(rank, world, port)
    inputs = denoiser_inputs()
    reference = StaticZImageDenoiser(transformer).eval()
    group = join(world, torch.device("cpu"), timeout_s=60)
    try:
        engine_cls = __import__("zimage_trt.engines.torch_compiled", fromlist=["x"]).CompiledDenoiserEngine if compiled \
            else __import__("zimage_trt.engines.base", fromlist=["x"]).TorchDenoiserEngine
        engine = shard_engine(engine_cls(StaticZImageDenoiser(transformer)), group)
        assert isinstance(engine.denoiser, SequenceShardedDenoiser) and not engine.supports_cuda_graph
        with torch.no_grad():
            for masked in (True,) if compiled else (True, False):  # (each compiled variant costs a compile)
                if not masked:  # without the key mask every caption must fill the capacity
                    inputs = (*inputs[:3], torch.full_like(inputs[3], inputs[2].shape[1]))
                expected = reference(*inputs, mask_caption_keys=masked)
                got = engine.run(*inputs, masked=masked)
                assert got.shape == expected.shape and got.dtype == torch.float32
                err = (got - expected).abs().max().item()
                assert err <= TOLERANCE * max(1.0, expected.abs().max().item()), (rank, masked, err)
                assert expected.abs().max() > 0.1  # not a trivially small output
    finally:
        group.close()


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])  # (4: zero heads padded in)
def test_sharded_denoiser_equals_one_process(world):
    spawn(_denoiser_parity, world, six_head_transformer(), False)


@pytest.mark.slow
def test_sharded_compiled_engine_equals_one_process():
    spawn(_denoiser_parity, 2, six_head_transformer(), True)


# -- degree and process-group checks (one process) ---------------------------------------------------
def test_any_degree_up_to_the_heads_is_accepted_and_more_is_refused():
    assert valid_degrees(HEADS) == [2, 3, 4, 5, 6]
    assert check_degree(4, HEADS) == 4 and check_degree(3, HEADS) == 3 and check_degree(1, HEADS) == 1
    assert [padded_heads(d, HEADS) for d in (1, 2, 3, 4, 5, 6)] == [0, 0, 0, 2, 4, 0]
    assert [padded_heads(d, 30) for d in (2, 3, 4, 5, 6, 8)] == [0, 0, 2, 0, 0, 2]  # Z-Image: 32 heads at 4 and 8
    with pytest.raises(ValueError, match=r"sequence_parallel=7 is more processes than the model's 6 attention heads.*"
                                         r"valid degrees for this model: 2 to 6"):
        check_degree(7, HEADS)
    with pytest.raises(ValueError, match="int >= 1"):
        check_degree(0, HEADS)


def test_the_pipeline_refuses_a_wrong_degree_before_joining_any_group(parts):
    from zimage_trt.pipeline import ZImageTRTPipeline

    with pytest.raises(ValueError, match="valid degrees for this model: 2 to 6"):
        ZImageTRTPipeline.from_components(**parts, device="cpu", sequence_parallel=7)


def test_without_torchrun_the_error_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SequenceParallelError, match="torchrun --nproc-per-node 2"):
        join(2, torch.device("cpu"))
    from zimage_trt.pipeline import ZImageTRTPipeline

    with pytest.raises(SequenceParallelError, match="torchrun --nproc-per-node 3"):  # before any loading
        ZImageTRTPipeline.from_pretrained("/nonexistent/model", device="cpu", sequence_parallel=3)


# -- the pipeline: rank 0 is called, the other ranks serve -------------------------------------------
@pytest.fixture(scope="module")
def parts():
    return six_head_components()


CALLS = [dict(prompt="a red fox in snow", height=256, width=256, num_inference_steps=2),
         # CFG (the model batch doubles) and a step callback on rank 0 that changes the latents
         dict(prompt="a tower", negative_prompt="blur", guidance_scale=2.0, height=256, width=320,
              num_inference_steps=2, callback_on_step_end=lambda pipe, i, t, kw: {"latents": kw["latents"] * 0.9})]


def run_calls(pipe) -> list[torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)
    return [pipe(generator=torch.Generator("cpu").manual_seed(11), output_type="latent", **call).images for call in CALLS]


def rank_pipeline(rank, world, port, parts, timeout_s: float):
    """This process as rank `rank` of `world`, and its pipeline over the tiny parts (captions unpadded)."""
    from zimage_trt.pipeline import ZImageTRTPipeline

    as_torchrun_rank(rank, world, port)
    return ZImageTRTPipeline.from_components(**parts, device="cpu", sequence_parallel=world,
                                             sequence_parallel_timeout_s=timeout_s, pad_prompts_to_max_length=False)


def _pipeline_parity(rank, world, port, parts, expected):
    pipe = rank_pipeline(rank, world, port, parts, timeout_s=60)
    try:
        if not pipe.is_main_process:
            with pytest.raises(SequenceParallelError, match="call pipe.serve"):
                pipe("x")
            assert pipe.serve() == len(CALLS)
            return
        for got, want in zip(run_calls(pipe), expected):
            err = (got - want).abs().max().item()
            assert err <= TOLERANCE * max(1.0, want.abs().max().item()), err
    finally:
        pipe.close()


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_pipeline_over_ranks_equals_one_process(parts, world):
    from zimage_trt.pipeline import ZImageTRTPipeline

    expected = run_calls(ZImageTRTPipeline.from_components(**parts, device="cpu", pad_prompts_to_max_length=False))
    spawn(_pipeline_parity, world, parts, expected)


class _StopHere(Exception):
    pass


def _stopped_call(rank, world, port, parts, expected):
    pipe = rank_pipeline(rank, world, port, parts, timeout_s=20)
    try:
        if not pipe.is_main_process:
            assert pipe.serve() == 2 and pipe._parallel.calls_stopped == 1
            return
        pipe.set_progress_bar_config(disable=True)

        def stop_at_second_step(pipe, i, t, kw):
            if i == 1:
                raise _StopHere  # as the service's callback stops a request that timed out
            return {}

        started = time.monotonic()
        with pytest.raises(_StopHere):
            pipe(generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
                 callback_on_step_end=stop_at_second_step, **{**CALLS[0], "num_inference_steps": 3})
        assert time.monotonic() - started < 15  # the other rank did not wait for a time-out
        # The group goes on: the next call (with a callback, so flags travel each step) equals one process.
        got = pipe(generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
                   callback_on_step_end=lambda pipe, i, t, kw: {}, **CALLS[0]).images
        err = (got - expected).abs().max().item()
        assert err <= TOLERANCE * max(1.0, expected.abs().max().item()), err
    finally:
        pipe.close()


@pytest.mark.slow
def test_a_call_stopped_by_rank_0s_callback_stops_every_rank_and_the_group_goes_on(parts):
    from zimage_trt.pipeline import ZImageTRTPipeline

    expected = run_calls(ZImageTRTPipeline.from_components(**parts, device="cpu", pad_prompts_to_max_length=False))[0]
    spawn(_stopped_call, 2, parts, expected)


def interrupt_at_first_step(pipe, i, t, kw):
    if i == 0:
        pipe._interrupt = True  # diffusers' interrupt: no further step
    return {}


def interrupted_calls(pipe) -> list[torch.Tensor]:
    """An interrupted call (3 steps, stopped after the first), then a plain call with a callback."""
    pipe.set_progress_bar_config(disable=True)
    return [pipe(generator=torch.Generator("cpu").manual_seed(11), output_type="latent",
                 callback_on_step_end=callback, **{**CALLS[0], "num_inference_steps": steps}).images
            for callback, steps in ((interrupt_at_first_step, 3), (lambda pipe, i, t, kw: {}, 2))]


def _interrupted_call(rank, world, port, parts, expected):
    pipe = rank_pipeline(rank, world, port, parts, timeout_s=20)
    try:
        if not pipe.is_main_process:
            assert pipe.serve() == 2 and pipe._parallel.calls_stopped == 1  # told to stop after step 1
            return
        for got, want in zip(interrupted_calls(pipe), expected):
            err = (got - want).abs().max().item()
            assert err <= TOLERANCE * max(1.0, want.abs().max().item()), err
    finally:
        pipe.close()


@pytest.mark.slow
def test_an_interrupt_set_by_rank_0s_callback_stops_every_rank_and_the_group_goes_on(parts):
    from zimage_trt.pipeline import ZImageTRTPipeline

    expected = interrupted_calls(ZImageTRTPipeline.from_components(**parts, device="cpu", pad_prompts_to_max_length=False))
    spawn(_interrupted_call, 2, parts, expected)


def _one_rank_fails(rank, world, port, parts, who_dies, who_hangs, timeout_s):
    from zimage_trt.pipeline import ZImageTRTPipeline

    as_torchrun_rank(rank, world, port)
    pipe = ZImageTRTPipeline.from_components(**parts, device="cpu", sequence_parallel=world,
                                             sequence_parallel_timeout_s=timeout_s, pad_prompts_to_max_length=False)
    if rank == who_dies:
        os._exit(3)  # no goodbye: as a crashed or killed process leaves
    if rank == who_hangs:
        time.sleep(timeout_s + 20)  # alive, but never joins the call
        os._exit(4)
    time.sleep(0.5)
    started = time.monotonic()
    try:
        if pipe.is_main_process:
            run_calls(pipe)
        else:
            pipe.serve()
    except SequenceParallelError as error:
        assert f"rank {rank} of 2: " in str(error) and "failed; another rank died" in str(error), error
        assert time.monotonic() - started < timeout_s + 10
        print(f"rank {rank} raised, {time.monotonic() - started:.1f} s after the call: {error}"[:400], flush=True)
        os._exit(0)
    os._exit(1)  # it should have failed


def run_failing_ranks(parts, who_dies=None, who_hangs=None, timeout_s=10.0) -> list[int]:
    # (Not mp.spawn: it terminates the other ranks as soon as one fails, before they could show anything.)
    context, port = mp.get_context("fork"), free_port()
    ranks = [context.Process(target=_one_rank_fails, args=(rank, 2, port, parts, who_dies, who_hangs, timeout_s))
             for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout_s + 60)
    return [p.exitcode for p in ranks]


@pytest.mark.parametrize("who_dies", [1, 0])
def test_a_rank_that_dies_makes_the_others_fail_clearly(parts, who_dies):
    assert run_failing_ranks(parts, who_dies=who_dies) == [3 if rank == who_dies else 0 for rank in range(2)]


@pytest.mark.slow
def test_a_rank_that_hangs_makes_rank_0_fail_within_the_timeout(parts):
    assert run_failing_ranks(parts, who_hangs=1, timeout_s=5.0) == [0, 4]


# -- the command line, under torchrun --------------------------------------------------------------
@pytest.fixture(scope="module")
def six_head_folder(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("six-heads") / "model", seed=0)
    six_head_transformer().save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def generate_args(folder, output, *extra):
    return ["generate", "--model", str(folder), "--engines", str(output.parent / "no-engines"), "--allow-fallback",
            "--prompt", "a fox", "--height", "256", "--width", "256", "--steps", "2", "--seed", "3", "--device", "cpu",
            "--output", str(output), *extra]


def test_the_command_line_refuses_a_wrong_degree(six_head_folder, tmp_path, capsys, monkeypatch):
    from zimage_trt.cli import main

    # As torchrun --nproc-per-node 7 starts rank 0 (the degree is refused before any group is joined).
    for name, value in dict(RANK="0", WORLD_SIZE="7", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    code = main(generate_args(six_head_folder, tmp_path / "x.png", "--sequence-parallel", "7"))
    assert code == 2
    assert "valid degrees for this model: 2 to 6" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_generate_equals_one_process(six_head_folder, tmp_path, world):
    from PIL import Image

    from zimage_trt.cli import main

    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    with pytest.warns(UserWarning):
        assert main(generate_args(six_head_folder, single)) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                          "--master-port", str(free_port()), "-m", "zimage_trt.cli",
                          *generate_args(six_head_folder, parallel, "--sequence-parallel", str(world))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote" in run.stdout and run.stdout.count("wrote") == 1  # rank 0 only
    with Image.open(single) as a, Image.open(parallel) as b:
        one, many = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert one.std() > 1.0
    # Latents agree within 1e-5 (the pipeline test above); through 8-bit pixels one level may flip.
    assert np.abs(one - many).max() <= 1


# -- the compiled kernels kept beside the engine -----------------------------------------------------
@pytest.mark.slow  # (a compile: ~20 s on a busy 2-core machine)
def test_sequence_parallel_kernels_are_kept_whole_and_loaded_only_when_they_match(tmp_path):
    from zimage_trt.parallel import artifacts

    torch.compile(lambda x: x * 2 + 1)(torch.randn(8))  # something compiled in this process
    path = artifacts.save(tmp_path, 2, "256x256-b1")
    assert path is not None and path.is_file()
    record = json.loads(artifacts.record_path(path).read_text())
    assert record["degree"] == 2 and record["shape"] == "256x256-b1" and record["bytes"] == path.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staged leftovers
    assert artifacts.load(tmp_path, 2) == ["256x256-b1"]
    assert artifacts.load(tmp_path, 3) == []  # another degree: other graphs
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # tampered or torn: refused
    with pytest.warns(UserWarning, match="does not match its record's sha256"):
        assert artifacts.load(tmp_path, 2) == []
    assert artifacts.load(tmp_path / "missing", 2) == []


def test_a_callbacks_error_is_the_one_raised_when_sending_stop_fails_too(caplog):
    """Rank 0's step callback raises (a request aborted) and the stop flag cannot be sent either: the
    callback's error reaches the caller, the flag's failure is logged."""
    from types import SimpleNamespace

    from zimage_trt.parallel.serve import _sending_latents

    class Aborted(Exception):
        pass

    def step_flag(go=False):
        raise RuntimeError("gloo: connection closed")

    coordinator = SimpleNamespace(group=SimpleNamespace(device=torch.device("cpu")), step_flag=step_flag)

    def callback(index, timestep, latents):
        raise Aborted("the client went away")

    on_step, _ = _sending_latents(callback, coordinator)
    with caplog.at_level("WARNING", logger="zimage_trt.parallel.serve"), pytest.raises(Aborted):
        on_step(0, torch.tensor(1000.0), torch.zeros(1))
    assert "connection closed" in caplog.text


def test_heads_per_rank_and_padded_heads_are_one_rule():
    from zimage_trt.parallel import attention, group

    assert attention.heads_per_rank is group.heads_per_rank  # one definition, the other derived from it
    for heads in (6, 30):
        for degree in range(2, heads + 1):
            assert group.heads_per_rank(heads, degree) * degree == heads + padded_heads(degree, heads)
