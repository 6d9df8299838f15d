"""Spies on the functions a module under test calls."""


def recorded(monkeypatch, owner, name):
    """Wrap ``owner.<name>`` (a module's function, or an object's method) for the test: every call's
    ``(args, kwargs, output)`` is kept in the returned list, and the call goes through unchanged."""
    calls = []
    real = getattr(owner, name)

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(owner, name, record)
    return calls
