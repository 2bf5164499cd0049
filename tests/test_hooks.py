"""pipetrain.hooks: nothing installed does nothing; an installed implementation is called, and
``installed`` puts back what was there."""

from __future__ import annotations

import pytest

from pipetrain import hooks


def test_the_default_points_do_nothing_and_hand_values_back():
    default = hooks.current()
    assert type(default) is hooks.Hooks
    place = hooks.Place(hooks.STAGE, 1, 0, 2)
    argv = ["python", "-P", "-m", "pipetrain.runtime.worker", "3", "4"]
    assert default.worker_command(place, argv) is argv
    channel = object()
    assert default.wrap_channel(place, hooks.Place(hooks.STAGE, 2, 0, 2), channel) is channel
    assert default.before_step(place, 5) is None
    assert default.quiet_boundary(5) is False  # the next step may start early
    assert default.step_started(5) is None
    assert str(place) == "stage 1 replica 0 (generation 2)"
    assert str(hooks.Place(hooks.COORDINATOR)) == "coordinator"


def test_installed_replaces_and_restores():
    calls = []

    class Recording(hooks.Hooks):
        def before_step(self, place, step):
            calls.append((place, step))

    before = hooks.current()
    with hooks.installed(Recording()) as recording:
        assert hooks.current() is recording
        hooks.current().before_step(hooks.Place(hooks.STAGE, 0, 0), 3)
    assert hooks.current() is before
    assert calls == [(hooks.Place(hooks.STAGE, 0, 0), 3)]


def test_only_a_hooks_implementation_installs():
    with pytest.raises(TypeError, match="pipetrain.hooks.Hooks"):
        hooks.install(object())  # type: ignore[arg-type]
