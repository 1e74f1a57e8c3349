"""The worker that owns the model: a FIFO of jobs, one generation at a time, cancellable.

MLX work stays on one thread (the model, its caches and the generation stream live there);
the event loop only renders prompts (tokenizer work, in a thread pool) and relays what the
worker sends back through each job's asyncio queue. A cancelled job (client gone, stop
string found) ends at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen3_chat.chat.session import soft_switch
from qwen3_chat.engine.defaults import ALWAYS, DEFAULT_BUDGET, DEFAULT_MAX_TOKENS, HYBRID, mode_name
from qwen3_chat.engine.events import AnswerText, Finished, ReasoningText
from qwen3_chat.engine.generate import release_thread_streams, stream_generate
from qwen3_chat.engine.phase import ThinkPhase
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.serve.prompt_cache import PromptCache
from qwen3_chat.serve.schema import ApiError, ChatRequest, bad, reasoning_fields, usage
from qwen3_chat.serve.tools import AnswerFilter, ToolCall

log = logging.getLogger("qwen3_chat.serve")
# Engine finish reasons in OpenAI's words: running out of context is a length stop too.
FINISH = {"stop": "stop", "length": "length", "context": "length", "interrupted": "stop"}


@dataclass
class ServeConfig:
    """What the server was started with; a request overrides per field."""

    model_id: str
    capability: str = HYBRID
    context_length: int | None = None
    budget: int | None = DEFAULT_BUDGET  # the REPL's defaults
    max_tokens: int = DEFAULT_MAX_TOKENS
    mode_sampling: dict[str, dict[str, Any]] | None = None  # models.toml, per mode
    max_queue: int = 16  # requests admitted at once (running + waiting); more get 429
    cache_entries: int = 8
    cache_bytes: int = 4 << 30


@dataclass
class Plan:
    """A request rendered to token ids with every setting resolved."""

    ids: list[int]
    thinking: bool
    budget: int | None
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    tools: list[dict] | None


class _TrailingNewlines:
    """Holds trailing newlines until more text follows: the newline before </think> or at
    the end of the answer is template layout, so streamed text matches the final text."""

    def __init__(self) -> None:
        self.held = ""

    def __call__(self, text: str) -> str:
        text = self.held + text
        body = text.rstrip("\n")
        self.held = text[len(body) :]
        return body


@dataclass
class Result:
    finish_reason: str
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    usage: dict[str, Any]

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        msg.update(reasoning_fields(self.reasoning))
        if self.tool_calls:
            msg["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        elif msg["content"] is None:
            msg["content"] = ""
        return msg


@dataclass(eq=False)  # jobs are compared by identity (kept in a set)
class Job:
    """One request in flight: the worker writes (kind, value) items to `out`."""

    plan: Plan
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class ServeEngine:
    def __init__(self, model: Any, tokenizer: Any, config: ServeConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context_length = config.context_length or model.config.max_position_embeddings
        self.cache = PromptCache(model.make_cache, config.cache_entries, config.cache_bytes)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._admitted: set[Job] = set()
        self._lock = threading.Lock()
        self._running: Job | None = None
        self._closing = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=16)
        self._thread = threading.Thread(target=self._work, name="qwen3-serve-worker", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def cancel_all(self) -> None:
        """Shutting down: refuse new jobs and end every admitted one at its next token."""
        with self._lock:
            self._closing = True
            for job in self._admitted:
                job.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything admitted and end the worker after its current token."""
        self.cancel_all()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- requests (event-loop side) -------------------------------------------------------
    def plan(self, req: ChatRequest) -> Plan:
        """Resolve thinking, budget and sampling, and render the prompt (no MLX work)."""
        cfg = self.config
        if cfg.capability != HYBRID:
            thinking = cfg.capability == ALWAYS
        elif req.enable_thinking is not None:
            thinking = req.enable_thinking
        elif req.budget_given and req.thinking_budget == 0:
            thinking = False  # a zero budget means non-thinking mode, as in the REPL
        else:
            last_user = next((m for m in reversed(req.messages) if m["role"] == "user"), None)
            switch = soft_switch(last_user["content"] or "") if last_user else None
            thinking = True if switch is None else switch
        budget = (req.thinking_budget if req.budget_given else cfg.budget) if thinking else None
        mode = (cfg.mode_sampling or {}).get(mode_name(thinking), {})
        try:
            sampling = SamplingParams.for_mode(thinking).replace(**mode).replace(**req.sampling)
            text = self.tokenizer.apply_chat_template(
                req.messages, add_generation_prompt=True, enable_thinking=thinking,
                tools=req.tools, **req.template_kwargs,
            )  # fmt: skip
        except Qwen3ChatError as e:  # a sampling rule names its field (SettingsError.param)
            raise bad(str(e), getattr(e, "param", None)) from None
        except TypeError as e:  # a sampling field SamplingParams does not know
            raise bad(f"bad setting: {e}") from None
        ids = self.tokenizer.encode(text)
        if len(ids) >= self.context_length:
            raise bad(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                      f"{self.context_length}", "messages", "context_length_exceeded")  # fmt: skip
        return Plan(ids, thinking, budget, req.max_tokens or cfg.max_tokens, sampling,
                    req.stop, req.tools)  # fmt: skip

    def submit(self, plan: Plan, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a job in arrival order, or refuse it (429) when the queue is full."""
        job = Job(plan, loop)
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down", type="server_error")
            if len(self._admitted) >= self.config.max_queue:
                self.counts["rejected"] += 1
                raise ApiError(429, f"too many requests: {self.config.max_queue} already queued",
                               type="rate_limit_error", code="queue_full")  # fmt: skip
            self._admitted.add(job)
        self._jobs.put(job)
        return job

    def health(self) -> dict[str, Any]:
        with self._lock:
            running = self._running is not None
            waiting = len(self._admitted) - running
            counts = dict(self.counts)
            recent = list(self.recent)
        return {
            "status": "shutting_down" if self._closing else "ok",
            "model": self.config.model_id,
            "context_length": self.context_length,
            "queue": {"running": int(running), "waiting": waiting, "limit": self.config.max_queue},
            "requests": counts,
            "prompt_cache": self.cache.stats(),
            "recent": recent,
        }

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._serve_jobs()
        finally:
            release_thread_streams()

    def _serve_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._running = job
            try:
                if job.cancelled.is_set():
                    self._record(job, "cancelled", None)
                    job.send("cancelled", None)  # a listener (shutdown) must not hang
                else:
                    self._run(job)
            except ApiError as e:
                self._record(job, "failed", None)
                job.send("error", e)
            except Exception as e:  # never let one request kill the worker
                log.exception("generation failed")
                self._record(job, "failed", None)
                job.send("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                           type="server_error"))  # fmt: skip
            finally:
                with self._lock:
                    self._running = None
                    self._admitted.discard(job)

    def _run(self, job: Job) -> None:
        plan = job.plan
        cache, reused = self.cache.take(plan.ids)
        answer_filter = AnswerFilter(plan.stops, plan.tools)
        trim_reasoning, trim_answer = _TrailingNewlines(), _TrailingNewlines()
        reasoning: list[str] = []
        answer: list[str] = []  # the text sent (stop strings already cut)
        finished: Finished | None = None
        events = stream_generate(
            self.model, self.tokenizer, plan.ids[reused:], cache=cache, sampling=plan.sampling,
            max_tokens=plan.max_tokens, thinking_budget=plan.budget, prompt_tokens=len(plan.ids),
            context_length=self.context_length,
            in_think=ThinkPhase.ends_inside(plan.ids, self.tokenizer.think_start_id,
                                            self.tokenizer.think_end_id),
        )  # fmt: skip
        try:
            for ev in events:
                if job.cancelled.is_set():
                    break
                if isinstance(ev, ReasoningText):
                    if text := trim_reasoning(ev.text):
                        reasoning.append(text)
                        job.send("reasoning", text)
                elif isinstance(ev, AnswerText):
                    if text := trim_answer(answer_filter.feed(ev.text)):
                        answer.append(text)
                        job.send("content", text)
                    if answer_filter.stopped:
                        break
                elif isinstance(ev, Finished):
                    finished = ev
        except Qwen3ChatError as e:
            raise bad(str(e)) from None
        finally:
            events.close()
            # The prompt is in the cache for sure; generated tokens only when we saw them all.
            held = plan.ids + list(finished.token_ids) if finished else plan.ids
            self.cache.put(held, cache)
        if job.cancelled.is_set():
            self._record(job, "cancelled", self._usage(plan, reused, reasoning, answer))
            job.send("cancelled", None)
            return
        tail, calls = answer_filter.finish()
        if tail := trim_answer(tail):
            answer.append(tail)
            job.send("content", tail)
        if finished is not None and not answer_filter.stopped:
            s = finished.stats
            use = usage(s.prompt_tokens, reused, s.reasoning_tokens, s.answer_tokens)
            finish = FINISH.get(s.finish_reason, s.finish_reason)
        else:  # cut at a stop string: count what was generated from its text
            use, finish = self._usage(plan, reused, reasoning, answer), "stop"
        if calls:
            finish = "tool_calls"
        result = Result(finish, "".join(answer).strip(), "".join(reasoning).strip(), calls, use)
        self._record(job, finish, use)
        job.send("done", result)

    def _usage(self, plan: Plan, reused: int, reasoning: Sequence[str],
               answer: Sequence[str]) -> dict[str, Any]:  # fmt: skip
        count = lambda parts: len(self.tokenizer.encode("".join(parts))) if parts else 0  # noqa: E731
        return usage(len(plan.ids), reused, count(reasoning), count(answer))

    def _record(self, job: Job, outcome: str, use: dict[str, Any] | None) -> None:
        key = {"cancelled": "cancelled", "failed": "failed"}.get(outcome, "completed")
        entry = {"finish_reason": outcome, "prompt_tokens": len(job.plan.ids),
                 "max_tokens": job.plan.max_tokens, "at": time.time()}  # fmt: skip
        if use is not None:
            entry["cached_tokens"] = use["prompt_tokens_details"]["cached_tokens"]
            entry["completion_tokens"] = use["completion_tokens"]
        with self._lock:
            self.counts[key] += 1
            self.recent.append(entry)
