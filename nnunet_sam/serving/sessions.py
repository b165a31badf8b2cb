"""Sessions: one client's image (an :class:`~nnunet_sam.serving.editors.Editor`), the server's copy of its target
buffer and the undo log; the lease registry with its capacity and expiry.

The server's buffer always equals the client's: each interaction computes the whole new result, writes the
voxels that differ into the buffer and answers the box around them (half-open ``[[lo, hi], ...]``) with that part
of the buffer, which the client pastes into its own. An undo entry keeps what the step changed, never a whole
volume: the part of the buffer it overwrote (the changed box) and the editor's difference from the state before
(:meth:`~nnunet_sam.serving.editors.Editor.difference`: for RadSAM the changed box of its mask), so undo restores
both exactly. The log holds at most ``undo_depth`` steps and ``undo_bytes`` bytes; the oldest steps go first (a
single step larger than ``undo_bytes`` empties the log: it cannot be undone).

Interactions sent with ``run_prediction: false`` wait in :attr:`Session.pending` until one that predicts, or
``/predict``, runs them all as one step (one undo).

A lease expires when the client has done nothing real (an image, a buffer, an interaction, undo, reset) for
``idle_timeout`` seconds, or has not been heard from at all (heartbeats included) for ``liveness_timeout``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask

from nnunet_sam.serving.editors import Editor
from nnunet_sam.serving.inputs import InteractionError

Change = tuple[list[list[int]] | None, np.ndarray | None]  # (box of changed voxels, the buffer there)
Step = tuple[str, tuple]  # an editor method's name and its arguments, e.g. ("point", (position, True))


class Session:
    """One client's state. Callers hold :attr:`lock` around every method."""

    def __init__(self, undo_depth: int, undo_bytes: int = 64 * 2**20) -> None:
        self.lock = threading.Lock()
        self.editor: Editor | None = None
        self.buffer: np.ndarray | None = None
        self.undo_log: deque = deque(maxlen=undo_depth)
        self.undo_bytes = undo_bytes
        self.pending: list[Step] = []
        self.last_active = self.last_seen = time.monotonic()

    def undo_log_bytes(self) -> int:
        """Bytes the undo log holds (its arrays)."""
        return sum(self._entry_bytes(entry) for entry in self.undo_log)

    def _entry_bytes(self, entry) -> int:
        difference, _, previous = entry
        return self.editor.difference_bytes(difference) + (0 if previous is None else previous.nbytes)

    def _log(self, entry) -> None:
        self.undo_log.append(entry)
        total = self.undo_log_bytes()
        while self.undo_log and total > self.undo_bytes:
            total -= self._entry_bytes(self.undo_log.popleft())

    def ready(self) -> Editor:
        if self.editor is None:
            raise InteractionError("no image in this session: call set_image first")
        if self.buffer is None:
            raise InteractionError("no target buffer in this session: call set_target_buffer after set_image")
        return self.editor

    def close(self) -> None:
        """The session ends: stop its editor's background work."""
        if self.editor is not None:
            self.editor.close()

    def set_editor(self, editor: Editor) -> None:
        self.close()
        self.editor, self.buffer = editor, None
        self.undo_log.clear()
        self.pending.clear()

    def set_buffer(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.undo_log.clear()
        self.pending.clear()
        if self.editor is not None:
            self.editor.reset()

    def queue(self, step: Step) -> None:
        """Keep an interaction for the next prediction (``run_prediction: false``)."""
        self.ready()
        self.pending.append(step)

    def predict(self, step: Step | None = None) -> Change | None:
        """Run the queued interactions and ``step`` as one step; None if there is nothing to run. If one of them is
        refused, none is applied and the queue is dropped (the message says so)."""
        steps = [*self.pending, *([step] if step is not None else [])]
        self.pending = []
        if not steps:
            return None
        try:
            return self.apply(lambda editor: editor.run(steps))
        except InteractionError as error:
            if len(steps) > 1:
                raise InteractionError(f"{error} (none of the {len(steps)} queued interactions was applied)") from None
            raise

    def apply(self, interaction: Callable[[Editor], np.ndarray]) -> Change:
        """Run an interaction that returns the new whole result; write the difference into the buffer."""
        editor = self.ready()
        before = editor.state()
        try:
            result = interaction(editor).astype(self.buffer.dtype, copy=False)
        except BaseException:
            editor.restore(before)
            raise
        difference = editor.difference(before)
        changed = result != self.buffer
        if not changed.any():
            self._log((difference, None, None))
            return None, None
        box = get_bbox_from_mask(changed)
        region = bounding_box_to_slice(box)
        previous = self.buffer[region].copy()
        self.buffer[region] = result[region]
        self._log((difference, box, previous))
        return box, self.buffer[region]

    def replace_buffer(self, content: np.ndarray, seed: Callable[[Editor], None]) -> None:
        """An initial segmentation: ``seed`` the editor from it and overwrite the buffer (the client already did)."""
        editor = self.ready()
        before = editor.state()
        seed(editor)
        self.pending.clear()
        changed = content.astype(self.buffer.dtype, copy=False) != self.buffer
        box = get_bbox_from_mask(changed) if changed.any() else None
        previous = None if box is None else self.buffer[bounding_box_to_slice(box)].copy()
        self.buffer[...] = content.astype(self.buffer.dtype, copy=False)
        self._log((editor.difference(before), box, previous))

    def undo(self) -> tuple[bool, Change]:
        """(whether anything was undone, the restored region). Queued interactions are dropped."""
        self.ready()
        self.pending.clear()
        if not self.undo_log:
            return False, (None, None)
        difference, box, previous = self.undo_log.pop()
        self.editor.undo(difference)
        if box is None:
            return True, (None, None)
        region = bounding_box_to_slice(box)
        self.buffer[region] = previous
        return True, (box, self.buffer[region])

    def reset(self) -> None:
        self.ready()
        self.editor.reset()
        self.buffer[...] = 0
        self.undo_log.clear()
        self.pending.clear()


class LeaseError(Exception):
    """The lease token is missing, unknown or expired (HTTP 410)."""


class AtCapacity(Exception):
    """All ``max_sessions`` leases are taken (HTTP 503)."""


class Registry:
    """Lease token -> :class:`Session`, with a capacity and the two timeouts."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout: float,
        liveness_timeout: float,
        undo_depth: int = 20,
        undo_bytes: int = 64 * 2**20,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout, self.liveness_timeout = idle_timeout, liveness_timeout
        self.undo_depth, self.undo_bytes = undo_depth, undo_bytes
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def claim(self) -> str:
        self.sweep()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise AtCapacity(
                    f"the server is at capacity ({self.max_sessions} sessions); try again when a client has closed "
                    "its session, or start the server with a larger --max-sessions"
                )
            token = secrets.token_hex(16)
            self._sessions[token] = Session(self.undo_depth, self.undo_bytes)
            return token

    def _expired(self, session: Session, now: float) -> str | None:
        if now - session.last_active > self.idle_timeout:
            return f"idle for more than {self.idle_timeout:g} s"
        if now - session.last_seen > self.liveness_timeout:
            return f"not heard from for more than {self.liveness_timeout:g} s"
        return None

    def get(self, token: str | None, active: bool = False, touch: bool = True) -> Session:
        """The session of ``token``; ``active`` marks real use (restarts the idle clock), ``touch`` liveness."""
        if not token:
            raise LeaseError("no lease token: claim a session first (POST /claim)")
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(token)
            reason = None if session is None else self._expired(session, now)
            if reason is not None:
                self._sessions.pop(token).close()
        if session is None:
            raise LeaseError("the lease is unknown or has expired; connect again to get a new session")
        if reason is not None:
            raise LeaseError(f"the lease has expired ({reason}); connect again to get a new session")
        if touch:
            session.last_seen = now
        if active:
            session.last_active = now
        return session

    def remaining(self, session: Session) -> float:
        return max(0.0, self.idle_timeout - (time.monotonic() - session.last_active))

    def release(self, token: str | None) -> bool:
        with self._lock:
            session = self._sessions.pop(token or "", None)
        if session is not None:
            session.close()
        return session is not None

    def sweep(self) -> int:
        """Drop expired sessions; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [t for t, s in self._sessions.items() if self._expired(s, now) is not None]
            for token in expired:
                self._sessions.pop(token).close()
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
