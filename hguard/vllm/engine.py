"""The server's engine interface (hguard/server/engine.py) on vLLM, with the probe inside its forward.

`VllmEngine` runs vLLM's `LLMEngine` in this process (one rank; `VLLM_ENABLE_V1_MULTIPROCESSING=0`) with
the guarded worker (worker.py), and drives it from one thread: it admits queued jobs as vLLM requests
(one per row, up to `max_batch_size` rows at once; vLLM batches them continuously), steps the engine,
pushes each request's new tokens into its `Row`, folds in the scores the worker filed, and hands each
job its events (`call_soon_threadsafe`): a `TokenEvent` per scored token, one `GuardResult` per row, then
`DONE`. Stop strings, abstention and cancelled jobs end a row in hguard's `Answer` and abort its request;
vLLM's own stop is the end-of-sequence token and the length.

`front(...)` is the model as the server sees it: tokenizer, chat template, config and probe, on a
weightless (meta-device) skeleton; the weights live in vLLM only, and the worker checks the probe's
column norms against the checkpoint.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..answer import Answer
from ..guard import Guard
from ..metrics import Metrics
from ..server.engine import DONE, Job, QueuedEngine, Settings, Timing
from .rows import Row
from .worker import Scaling

_serial = itertools.count()


def front(model: str | Path, probe=None, threshold: float | None = None) -> Guard:
    """A Guard on a weightless skeleton of `model` (a local directory or a hub id vLLM can load)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(model))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.config._name_or_path = str(model)
    try:
        skeleton.generation_config = GenerationConfig.from_pretrained(str(model))
    except OSError:  # no generation_config.json: the config's own
        pass
    return Guard(skeleton, AutoTokenizer.from_pretrained(str(model)), probe, threshold=threshold, check_weights=False)


class VllmEngine(QueuedEngine):
    """vLLM with hguard's probe in its forward, behind the server's engine interface."""

    def __init__(self, guard: Guard, model: str | Path, *, max_batch_size: int = 32, max_queue: int = 256,
                 metrics: Metrics | None = None, dtype: str = "auto", enforce_eager: bool = False,
                 engine_args: dict[str, Any] | None = None) -> None:
        super().__init__(max_batch_size, max_queue, metrics)
        self.guard, self.model = guard, str(model)
        self.dtype, self.enforce_eager, self.engine_args = dtype, enforce_eager, dict(engine_args or {})
        self._jobs: dict[int, _Running] = {}
        self._rows: dict[str, tuple[_Running, Row]] = {}
        self._probe_file: Path | None = None
        self.llm = None
        self.scores = None
        self.max_model_len: int | None = None  # the server's context limit, known once started

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Build vLLM's engine in the driving thread (vLLM's CPU kernels bind their threads to the thread
        that built them) and wait for it: errors surface here, at start-up."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the driver reads the worker's scores directly
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._build()
            except BaseException as error:
                failure.append(error)
                return
            finally:
                ready.set()
            self._work()

        self._thread = threading.Thread(target=run, name="hguard-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._forget_probe_file()
            raise failure[0]

    def _build(self) -> None:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from .worker import worker_class

        probe = self.guard.probe  # saved as it is now (its file, if any, may hold something else)
        self._probe_file = Path(tempfile.mkdtemp(prefix="hguard-vllm-")) / "probe.safetensors"
        path = str(probe.save(self._probe_file))
        args = EngineArgs(model=self.model, dtype=self.dtype, enforce_eager=self.enforce_eager,
                          max_num_seqs=self.max_batch_size, worker_cls=worker_class(),
                          # the probe is part of the compiled graph: its checksum is part of the compile cache's key
                          additional_config={"hguard": {"probe": path, "checksum": probe.checksum}},
                          **self.engine_args)
        config = args.create_engine_config()
        for name, refused in (("tensor_parallel_size > 1", config.parallel_config.tensor_parallel_size > 1),
                              ("pipeline_parallel_size > 1", config.parallel_config.pipeline_parallel_size > 1),
                              ("speculative decoding", config.speculative_config is not None)):
            if refused:
                raise ValueError(f"the vLLM engine with hguard does not support {name} yet")
        # the context the server may fill: one position less than vLLM's, since each request runs one token
        # past its answer so that the answer's last token is fed back and scored
        self.max_model_len = int(config.model_config.max_model_len) - 1
        self.llm = LLMEngine.from_vllm_config(config)
        self.scores = self.llm.collective_rpc("hguard_scores")[0]

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.llm = None
        self._forget_probe_file()

    def _forget_probe_file(self) -> None:
        if self._probe_file is not None:
            self._probe_file.unlink(missing_ok=True)
            self._probe_file.parent.rmdir()
            self._probe_file = None

    @property
    def running(self) -> int:
        return len(self._jobs)

    # ---- the driving thread -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._rows:
                    self._condition.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            if not self._rows:
                continue
            try:
                self._step()
            except BaseException as error:  # reported to every running job; the engine goes on
                for running in list(self._jobs.values()):
                    running.job.send(error)
                    self._end(running, aborted=True)
        for running in list(self._jobs.values()):
            self._end(running, aborted=True)

    def _admit(self) -> list[Job]:
        rows, admitted = len(self._rows), []
        while self._waiting and rows + len(self._waiting[0].rows) <= self.max_batch_size:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                job.send(DONE)
                continue
            admitted.append(job)
            rows += len(job.rows)
        if admitted:
            self._gauges()
        return admitted

    def _start(self, job: Job) -> None:
        settings = job.settings
        try:
            policy = self.guard.policy(settings.action, settings.threshold, settings.alpha)
        except ValueError as error:
            job.send(error)
            job.send(DONE)
            return
        job.started = time.perf_counter()
        running = _Running(job, Timing(self.metrics, [job]))
        self._jobs[id(job)] = running
        try:
            self._add_rows(running, policy)
        except Exception as error:  # vLLM refused a request: this job fails, the engine goes on
            job.send(error)
            self._end(running, aborted=True)
            return
        self._gauges()

    def _add_rows(self, running: "_Running", policy) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        job, settings = running.job, running.job.settings
        eos = self.guard._eos_ids()
        serial = next(_serial)
        for index, prompt in enumerate(job.rows):
            request_id = f"hg{serial}x{index}"  # no "-": vLLM appends its own suffix after one
            answer = Answer(self.guard.tokenizer, index, eos, settings.stop, job.max_new_tokens, len(prompt),
                            abstains=policy is not None and policy.action == "abstain", streaming=True)
            row = Row(request_id, answer, policy, self.guard.probe.calibration, settings.logprobs)
            running.rows.append(row)
            self._rows[request_id] = (running, row)
            scaled = policy is not None and policy.action == "scale" and policy.scales
            if scaled:  # from the prompt's first position, as the HF guard scales it
                self.scores.scaling[request_id] = Scaling(policy.alpha, 0)
            request = TokensPrompt(prompt_token_ids=list(prompt))
            if scaled:  # a prompt computed with scaled H-Neurons shares no prefix-cache block with others
                request["cache_salt"] = f"hguard-scale-{policy.alpha!r}"
            self.llm.add_request(request_id, request, _sampling(SamplingParams, settings, job.max_new_tokens, eos, index))

    def _step(self) -> None:
        outputs = self.llm.step()
        for output in outputs:
            entry = self._rows.get(output.request_id) or self._rows.get(output.request_id.rsplit("-", 1)[0])
            if entry is None:
                continue
            _, row = entry
            completion = output.outputs[0]
            pushed = len(row.answer.pushed)
            tokens = list(completion.token_ids)[pushed:]
            logprobs = list(completion.logprobs)[pushed:] if completion.logprobs else None
            row.push(tokens, logprobs)
            row.finished = output.finished
        for running in list(self._jobs.values()):
            self._advance(running)

    def _advance(self, running: "_Running") -> None:
        job = running.job
        if job.cancelled.is_set():
            self._end(running, aborted=True)
            return
        for row in running.rows:
            if not row.answer.ended:
                for event in row.fold(self.scores):
                    running.timing.token(job, row.answer.row)
                    job.send(event)
            if row.answer.ended and not row.finished:
                self.llm.abort_request([row.request_id])  # a stop string, abstain or the limit: done here
                row.finished = True
        if all(row.finished for row in running.rows):
            threshold = self.guard.threshold if job.settings.threshold is None else job.settings.threshold
            for row in running.rows:
                rest, result = row.result()
                if rest is not None:
                    job.send(rest)
                running.timing.result(job, result, threshold)
                job.send(result)
            self._end(running, aborted=False)

    def _end(self, running: "_Running", aborted: bool) -> None:
        if aborted:
            open_rows = [row.request_id for row in running.rows if not row.finished]
            if open_rows and self.llm is not None:
                try:
                    self.llm.abort_request(open_rows)
                except Exception:  # an engine that just failed may fail this too; the job ends regardless
                    pass
        for row in running.rows:
            self._rows.pop(row.request_id, None)
            self.scores.forget(row.request_id)
        self._jobs.pop(id(running.job), None)
        running.job.send(DONE)
        self._gauges()


class _Running:
    """A job being served: its rows (one vLLM request each) and its timing."""

    def __init__(self, job: Job, timing: Timing) -> None:
        self.job, self.timing = job, timing
        self.rows: list[Row] = []


def _sampling(params_class, settings: Settings, limit: int, eos: set[int], index: int):
    """vLLM's SamplingParams for one row: one token beyond the answer's limit (so that its last token is
    fed back and scored), hguard's end-of-sequence ids, no stop strings (the Answer finds them), and a
    seed per row (the n rows of a seeded request are n different samples)."""
    greedy = settings.temperature <= 0
    return params_class(
        n=1, max_tokens=limit + 1, temperature=0.0 if greedy else settings.temperature,
        top_p=1.0 if greedy else settings.top_p, top_k=settings.top_k if settings.top_k and not greedy else 0,
        min_p=settings.min_p or 0.0, repetition_penalty=settings.repetition_penalty or 1.0,
        min_tokens=settings.min_tokens or 0, stop_token_ids=sorted(eos), logprobs=settings.logprobs,
        seed=None if settings.seed is None else settings.seed + index, detokenize=False,
    )
