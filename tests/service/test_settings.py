import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_BUNDLE, Settings


def test_defaults_serve_the_shipped_bundle_embedded_on_localhost(monkeypatch):
    for key in ("MAGNET_BUNDLE", "MAGNET_UPSTREAM", "MAGNET_HOST", "MAGNET_PORT"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.bundle, s.upstream, s.host, s.port) == (DEFAULT_BUNDLE, None, "127.0.0.1", 8000)
    assert s.explain is False


def test_environment_twins(monkeypatch):
    monkeypatch.setenv("MAGNET_UPSTREAM", "http://triton:8000")
    monkeypatch.setenv("MAGNET_PORT", "9000")
    monkeypatch.setenv("MAGNET_EXPLAIN", "true")
    s = Settings()
    assert (s.upstream, s.port, s.explain) == ("http://triton:8000", 9000, True)
    assert Settings(port=9100).port == 9100  # explicit values (CLI flags) win over the environment


def test_every_field_is_documented():
    assert all(f.description for f in Settings.model_fields.values())


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("MAGNET_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("name", ["my session", "a;b", "a=b", '"x"', ""])
def test_a_cookie_name_must_be_a_token(name):
    with pytest.raises(ValidationError, match="cookie name"):
        Settings(session_cookie=name)
    assert Settings(session_cookie="magnet.session-2").session_cookie == "magnet.session-2"
