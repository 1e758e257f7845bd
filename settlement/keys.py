"""The settler's private key: loaded from the environment or a key file, never shown.

A key file holds either a hex private key or an eth-account encrypted keystore (JSON, "Web3 Secret
Storage"); a keystore's passphrase comes from the file $MERITNET_KEY_PASSWORD_FILE names, else from a
prompt when a terminal is attached. A key file (and a passphrase file) must not be readable by group or
others (it is refused, with the chmod to run). The
environment variable suits a standalone settler process only: a process that starts Ray passes its
environment to every Ray worker (vLLM processes included), so `meritnet up` refuses it.

`SettlerKey` holds the key inside an eth-account `LocalAccount` and exposes only the address and
signing. Its repr/str name the address, and every error message here names where the key was looked
for, never the key's bytes, so neither a log line nor a traceback can leak it.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from eth_account import Account
from eth_account.signers.local import LocalAccount

KEY_ENV = "MERITNET_SETTLER_KEY"
KEY_FILE_ENV = "MERITNET_SETTLER_KEY_FILE"
PASSWORD_FILE_ENV = "MERITNET_KEY_PASSWORD_FILE"  # a file holding a keystore's passphrase (chmod 600)


class Signer(Protocol):
    """What settlement and validators sign with: a `SettlerKey`, or the handle on a key held by the
    signer process outside Ray (deploy/signer.py)."""

    @property
    def address(self) -> str: ...

    def sign_transaction(self, tx: dict) -> bytes: ...

    def sign_typed_data(self, full_message: dict) -> Any: ...


class SettlerKeyError(ValueError):
    """The settler key is missing or malformed (the message never contains the key)."""


def _private_text(path: Path, what: str) -> str:
    """A file's text, refused when group or others may read it."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SettlerKeyError(
                f"the {what} file {path} is readable by group or others (mode {mode & 0o777:o}); "
                f"run `chmod 600 {path}`"
            )
        return path.read_text()
    except OSError as exc:
        raise SettlerKeyError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def keystore_passphrase(path: Path, confirm: bool = False) -> str:
    """A keystore's passphrase: the first line of the file $MERITNET_KEY_PASSWORD_FILE names, else a
    prompt on the terminal (`confirm`: asked twice, for a new keystore). Never an environment variable
    holding the passphrase itself: Ray workers inherit the environment."""
    named = os.environ.get(PASSWORD_FILE_ENV)
    if named:
        lines = _private_text(Path(named), "passphrase").splitlines()
        return lines[0] if lines else ""
    if not sys.stdin.isatty():
        raise SettlerKeyError(
            f"{path} is an encrypted keystore and no terminal is attached to ask its passphrase: set "
            f"${PASSWORD_FILE_ENV} to a file (chmod 600) holding it"
        )
    passphrase = getpass.getpass(f"Passphrase for {path}: ")
    if confirm and getpass.getpass("Again: ") != passphrase:
        raise SettlerKeyError("the two passphrases differ")
    return passphrase


class SettlerKey:
    """A signing key whose secret never reaches a log, repr or error message."""

    __slots__ = ("_account",)

    def __init__(self, account: LocalAccount) -> None:
        self._account = account

    @classmethod
    def from_hex(cls, secret: str, source: str = "the given value") -> SettlerKey:
        try:
            account = Account.from_key(secret.strip())
        except Exception:  # noqa: BLE001 - eth-account's message may quote the input; we replace it.
            raise SettlerKeyError(
                f"the settler key from {source} is not a valid 32-byte hex private key "
                "(expected 64 hex digits, optionally 0x-prefixed)"
            ) from None
        return cls(account)

    @classmethod
    def load(cls, key_file: Path | None = None) -> SettlerKey:
        """From $MERITNET_SETTLER_KEY, else the key file (argument or $MERITNET_SETTLER_KEY_FILE)."""
        secret = os.environ.get(KEY_ENV)
        if secret:
            return cls.from_hex(secret, f"${KEY_ENV}")
        path = key_file or (Path(os.environ[KEY_FILE_ENV]) if os.environ.get(KEY_FILE_ENV) else None)
        if path is None:
            raise SettlerKeyError(
                f"no settler key: set ${KEY_ENV} to a hex private key, or ${KEY_FILE_ENV} to a file holding one"
            )
        return cls.from_file(Path(path))

    @classmethod
    def from_file(cls, path: Path, what: str = "settler key") -> SettlerKey:
        """From a key file that only its owner can read (any signing key: the settler's, an operator's):
        a hex private key, or an encrypted keystore JSON (passphrase: see `keystore_passphrase`)."""
        text = _private_text(path, what)
        if text.lstrip().startswith("{"):
            return cls.from_keystore(text, keystore_passphrase(path), f"{what} keystore {path}")
        return cls.from_hex(text, f"{what} file {path}")

    @classmethod
    def from_keystore(cls, text: str, passphrase: str, source: str = "the keystore") -> SettlerKey:
        """From an eth-account keystore JSON (scrypt or pbkdf2) and its passphrase."""
        try:
            secret = Account.decrypt(json.loads(text), passphrase)
        except ValueError as exc:
            wrong = "MAC mismatch" in str(exc)
            raise SettlerKeyError(
                f"wrong passphrase for the {source}"
                if wrong
                else f"the {source} is not an eth-account keystore JSON (version 3)"
            ) from None
        except (KeyError, TypeError):
            raise SettlerKeyError(f"the {source} is not an eth-account keystore JSON (version 3)") from None
        return cls(Account.from_key(secret))

    def export_keystore(self, passphrase: str) -> dict:
        """The key encrypted with `passphrase` (eth-account's keystore, scrypt): safe to back up."""
        return Account.encrypt(self._account.key, passphrase)

    @classmethod
    def generate(cls) -> SettlerKey:
        """A fresh random key (the embedded chain and tests fund it themselves)."""
        return cls(Account.create())

    @property
    def address(self) -> str:
        return self._account.address

    def sign_transaction(self, tx: dict) -> bytes:
        """Raw signed transaction bytes, ready for eth_sendRawTransaction."""
        return bytes(self._account.sign_transaction(tx).raw_transaction)

    def sign_typed_data(self, full_message: dict):
        """An EIP-712 signature (eth-account's SignedMessage: the signature and hash, not the key)."""
        return self._account.sign_typed_data(full_message=full_message)

    def export_hex(self) -> str:
        """The secret itself, only for writing a key file the caller controls (e.g. tests)."""
        return self._account.key.hex()

    def __repr__(self) -> str:
        return f"SettlerKey(address={self.address})"

    __str__ = __repr__

    def __reduce__(self):  # pickling would copy the secret into whatever store receives it
        raise TypeError("SettlerKey cannot be pickled; load it where it is used (SettlerKey.load())")
