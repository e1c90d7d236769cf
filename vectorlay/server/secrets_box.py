"""Secrets at rest: encrypted with a key that lives only in the server's state dir.

The database never holds a secret in clear; a replica's secret values are decrypted only when a
command or desired state is sent to the node that runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from vectorlay.errors import StoreError
from vectorlay.files import write_private
from vectorlay.server import shared_state


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)
        self.fingerprint = shared_state.fingerprint(key)  # which key, for servers sharing a database

    @staticmethod
    def new_key() -> bytes:
        return Fernet.generate_key()

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> SecretBox:
        """Load `secrets.key`, creating it (mode 0600) on first use."""
        path = state_dir / "secrets.key"
        if not path.exists():
            write_private(path, Fernet.generate_key().decode() + "\n")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return cls(path.read_text().strip().encode())

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise StoreError("a stored secret cannot be decrypted with this server's secrets.key") from None
