"""Keys an operator keeps: eth-account encrypted keystores wherever a key file is taken (`node join
--key-file`, `settlement claim --operator-key-file`, the settler's key file), the passphrase from a
prompt or from the file $MERITNET_KEY_PASSWORD_FILE names; `node keygen` never overwrites a key."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deploy.node_cli import node_app
from settlement.keys import PASSWORD_FILE_ENV, SettlerKey, SettlerKeyError

PASSPHRASE = "correct horse battery staple"


def private(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture()
def passphrase_file(tmp_path, monkeypatch):
    path = private(tmp_path / "pass.txt", PASSPHRASE + "\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def keystore() -> tuple[SettlerKey, str]:
    key = SettlerKey.generate()
    return key, json.dumps(key.export_keystore(PASSPHRASE))


def test_a_keystore_file_loads_with_the_passphrase_file(tmp_path, passphrase_file, keystore):
    key, text = keystore
    loaded = SettlerKey.from_file(private(tmp_path / "operator.json", text), what="operator key")
    assert loaded.address == key.address


def test_a_hex_key_file_still_loads(tmp_path):
    key = SettlerKey.generate()
    assert SettlerKey.from_file(private(tmp_path / "operator.key", key.export_hex())).address == key.address


def test_a_wrong_passphrase_says_so_and_never_shows_a_secret(tmp_path, passphrase_file, keystore):
    key, text = keystore
    private(passphrase_file, "wrong\n")
    with pytest.raises(SettlerKeyError, match="wrong passphrase") as info:
        SettlerKey.from_file(private(tmp_path / "operator.json", text))
    assert "wrong\n" not in str(info.value) and key.export_hex()[2:] not in str(info.value)


def test_without_a_terminal_or_passphrase_file_it_says_how(tmp_path, monkeypatch, keystore):
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(SettlerKeyError, match=PASSWORD_FILE_ENV):
        SettlerKey.from_file(private(tmp_path / "operator.json", keystore[1]))


def test_a_prompted_passphrase_works(tmp_path, monkeypatch, keystore):
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", lambda prompt: PASSPHRASE)
    assert SettlerKey.from_file(private(tmp_path / "k.json", keystore[1])).address == keystore[0].address


def test_a_readable_passphrase_file_or_keystore_is_refused(tmp_path, passphrase_file, keystore):
    path = private(tmp_path / "operator.json", keystore[1])
    passphrase_file.chmod(0o644)
    with pytest.raises(SettlerKeyError, match="chmod 600"):
        SettlerKey.from_file(path)
    passphrase_file.chmod(0o600)
    path.chmod(0o640)
    with pytest.raises(SettlerKeyError, match="chmod 600"):
        SettlerKey.from_file(path)


def test_a_json_that_is_not_a_keystore_is_named(tmp_path, passphrase_file):
    with pytest.raises(SettlerKeyError, match="not an eth-account keystore"):
        SettlerKey.from_file(private(tmp_path / "x.json", '{"hello": 1}'))


def test_keygen_writes_a_private_keystore_and_never_overwrites(tmp_path, passphrase_file):
    out = tmp_path / "operator.json"
    first = CliRunner().invoke(node_app, ["keygen", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert out.stat().st_mode & 0o777 == 0o600
    key = SettlerKey.from_file(out)
    assert key.address in first.output and json.loads(out.read_text())["version"] == 3
    before = out.read_text()
    again = CliRunner().invoke(node_app, ["keygen", "--out", str(out)])
    assert again.exit_code == 2 and "never overwritten" in again.output and out.read_text() == before
    plain = CliRunner().invoke(node_app, ["keygen", "--out", str(tmp_path / "op.key"), "--plain"])
    assert plain.exit_code == 0 and SettlerKey.from_file(tmp_path / "op.key").address in plain.output
