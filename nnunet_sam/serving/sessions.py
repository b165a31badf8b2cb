"""Sessions: one client's image (an :class:`~nnunet_sam.serving.editors.Editor`), the server's copy of its target
buffer and the undo log; the lease registry with its capacity and expiry.

The server's buffer always equals the client's: each interaction computes the whole new result, writes the
voxels that differ into the buffer and answers the box around them (half-open ``[[lo, hi], ...]``) with that part
of the buffer, which the client pastes into its own. An undo entry keeps the method's state before the interaction
and the part of the buffer it overwrote, so undo restores both exactly.

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


class Session:
    """One client's state. Callers hold :attr:`lock` around every method."""

    def __init__(self, undo_depth: int) -> None:
        self.lock = threading.Lock()
        self.editor: Editor | None = None
        self.buffer: np.ndarray | None = None
        self.undo_log: deque = deque(maxlen=undo_depth)
        self.last_active = self.last_seen = time.monotonic()

    def ready(self) -> Editor:
        if self.editor is None:
            raise InteractionError("no image in this session: call set_image first")
        if self.buffer is None:
            raise InteractionError("no target buffer in this session: call set_target_buffer after set_image")
        return self.editor

    def set_editor(self, editor: Editor) -> None:
        self.editor, self.buffer = editor, None
        self.undo_log.clear()

    def set_buffer(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.undo_log.clear()
        if self.editor is not None:
            self.editor.reset()

    def apply(self, interaction: Callable[[Editor], np.ndarray]) -> Change:
        """Run an interaction that returns the new whole result; write the difference into the buffer."""
        editor = self.ready()
        before = editor.state()
        result = interaction(editor).astype(self.buffer.dtype, copy=False)
        changed = result != self.buffer
        if not changed.any():
            self.undo_log.append((before, None, None))
            return None, None
        box = get_bbox_from_mask(changed)
        region = bounding_box_to_slice(box)
        self.undo_log.append((before, box, self.buffer[region].copy()))
        self.buffer[region] = result[region]
        return box, self.buffer[region]

    def replace_buffer(self, content: np.ndarray, seed: Callable[[Editor], None]) -> None:
        """An initial segmentation: ``seed`` the editor from it and overwrite the buffer (the client already did)."""
        editor = self.ready()
        before = editor.state()
        seed(editor)
        box = [[0, n] for n in self.buffer.shape]
        self.undo_log.append((before, box, self.buffer.copy()))
        self.buffer[...] = content.astype(self.buffer.dtype, copy=False)

    def undo(self) -> tuple[bool, Change]:
        """(whether anything was undone, the restored region)."""
        self.ready()
        if not self.undo_log:
            return False, (None, None)
        state, box, previous = self.undo_log.pop()
        self.editor.restore(state)
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


class LeaseError(Exception):
    """The lease token is missing, unknown or expired (HTTP 410)."""


class AtCapacity(Exception):
    """All ``max_sessions`` leases are taken (HTTP 503)."""


class Registry:
    """Lease token -> :class:`Session`, with a capacity and the two timeouts."""

    def __init__(self, max_sessions: int, idle_timeout: float, liveness_timeout: float, undo_depth: int = 20) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout, self.liveness_timeout = idle_timeout, liveness_timeout
        self.undo_depth = undo_depth
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
            self._sessions[token] = Session(self.undo_depth)
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
                del self._sessions[token]
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
            return self._sessions.pop(token or "", None) is not None

    def sweep(self) -> int:
        """Drop expired sessions; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [t for t, s in self._sessions.items() if self._expired(s, now) is not None]
            for token in expired:
                del self._sessions[token]
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            self._sessions.clear()
