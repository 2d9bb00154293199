"""The queue-full refusal, told like every other refusal: the limit, and when to retry.

gradio answers a full queue with HTTP 503, and its clients replace whatever the server said with a fixed
"Queue is full! Please try again." (gradio_client) or "This application is currently busy" (the browser).
So a request that finds the queue full is accepted and at once completed with an error carrying our message, the
way gradio itself completes a request served from its cache: every client shows it. Should gradio's internals
move, the refusal falls back to gradio's 503, with our message as its ``detail``.
"""

from __future__ import annotations

import math
from asyncio import Queue as AsyncQueue
from typing import Any

import gradio as gr

from pixsigma_ui.inputs import log

UNTIMED_REQUEST_S = 30.0  # a request's duration for the retry estimate before the queue has timed one


def queue_full_message(limit: int, retry_s: float) -> str:
    return (f"the queue is full: {limit} requests are already waiting, the most this server accepts; "
            f"retry in about {math.ceil(retry_s)} s")


def retry_after_s(queue: Any, concurrency: int) -> float:
    """How long the waiting requests take to clear: the queue at the mean request duration seen so far."""
    times = [t.avg_time for t in queue.process_time_per_fn.values() if t.count]
    mean = sum(times) / len(times) if times else UNTIMED_REQUEST_S
    return queue.max_size * mean / max(concurrency, 1)


def explain_queue_full(demo: gr.Blocks, concurrency: int) -> None:
    """Wrap ``demo``'s queue (after ``demo.queue(...)``) so a full queue refuses with :func:`queue_full_message`."""
    queue = demo._queue
    push = queue.push

    async def push_or_refuse(body: Any, request: Any, username: str | None) -> tuple[bool, Any, str]:
        ok, detail, state = await push(body=body, request=request, username=username)
        if state != "queue_full":
            return ok, detail, state
        message = queue_full_message(queue.max_size, retry_after_s(queue, concurrency))
        log.info("refused: %s", message)
        try:
            return True, await _complete_with_error(queue, body, request, username, message), "success"
        except Exception:  # gradio's internals moved: its own 503, with our words as the detail
            log.exception("could not deliver the queue-full message in the event stream")
            return ok, message, state

    queue.push = push_or_refuse


async def _complete_with_error(queue: Any, body: Any, request: Any, username: str | None, message: str) -> str:
    """Register an event for ``body`` that never enters the queue and send its completion: an error (gradio's
    own cache-hit path in ``Queue.push``, with an error for a result). Returns the event id."""
    from gradio import route_utils
    from gradio.queueing import Event
    from gradio.server_messages import ProcessCompletedMessage
    from gradio.utils import error_payload

    fn = route_utils.get_fn(queue.blocks, None, body)
    event = Event(body.session_hash, fn, request, username)
    event.data = body
    if body.session_hash is None:
        body.session_hash = event.session_hash
    async with queue.pending_message_lock:
        queue.pending_messages_per_session.setdefault(body.session_hash, AsyncQueue())
        queue.pending_event_ids_session.setdefault(body.session_hash, set())
    queue.pending_event_ids_session[body.session_hash].add(event._id)  # the stream closes once it is completed
    # Not in queue.event_ids_to_events: nothing would remove it there (every lookup of it tolerates its absence).
    content = error_payload(gr.Error(message, title="Queue full", print_exception=False), True)
    queue.send_message(event, ProcessCompletedMessage(output=content, title="Queue full", success=False))
    return event._id
