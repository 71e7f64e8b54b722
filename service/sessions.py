"""Per-session choice of a pool member (MagNet's graybox defense), the gateway's business: the core
defends with whichever member it is told.

member = HMAC-SHA256(secret, session id) mod n: sticky for a session, unpredictable without the
secret, and identical on every replica that shares the secret, so no shared state is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

log = logging.getLogger("magnet")


class MemberSelector:
    def __init__(self, secret: bytes, members: int) -> None:
        if members < 1:
            raise ValueError("a pool needs at least one member")
        if len(secret) < 16:
            raise ValueError("the session secret must be at least 16 bytes")
        self._secret = secret
        self.members = members

    def member(self, session_id: str) -> int:
        """Index of the member that defends ``session_id`` (0 <= index < members)."""
        if self.members == 1:
            return 0
        digest = hmac.new(self._secret, session_id.encode(), hashlib.sha256).digest()
        # 256 bits mod a small n: the bias is below 2**-250, far under any measurable skew
        return int.from_bytes(digest, "big") % self.members


def make_selector(secret: bytes | None, members: int) -> MemberSelector:
    """The selector for ``members`` members; a random secret (with a warning for pools) when none is set."""
    if secret is not None:
        return MemberSelector(secret, members)
    if members > 1:
        log.warning("MAGNET_SESSION_SECRET is unset: using a random secret, so replicas of this gateway "
                    "will pick different pool members for the same session")
    return MemberSelector(secrets.token_bytes(32), members)
