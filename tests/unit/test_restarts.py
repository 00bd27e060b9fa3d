"""When `dejavu up` starts a dead service again (dejavu.cli.Restarts)."""

from dejavu.cli import Restarts


def test_a_service_killed_again_and_again_comes_back_ever_later_but_always():
    """A probe SIGKILLed the only token service 4 times within a minute: `dejavu up` left it dead
    for good, and every request after got a 503 (no token service registered) until a person
    restarted the cluster. Now the first 3 deaths in a row restart it at once, then after 1, 2,
    4 ... s, never more than 30 s, and never never."""
    r = Restarts()
    delays = [r.delay("token-0", ran_s=5.0) for _ in range(10)]
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]
    assert not r.give_up("token-0", "token")
    assert r.delay("token-0", ran_s=Restarts.STABLE_S) == 0  # a long run ends the row
    assert r.row["token-0"] == 1
    assert r.delay("prompt-0", ran_s=1.0) == 0  # each service its own row


def test_a_gateway_that_keeps_dying_is_given_up():
    """Without it nothing is served: `dejavu up` says so and exits rather than wait on it."""
    r = Restarts()
    for _ in range(Restarts.QUICK):
        r.delay("gateway-0", ran_s=1.0)
        assert not r.give_up("gateway-0", "gateway")
    r.delay("gateway-0", ran_s=1.0)
    assert r.give_up("gateway-0", "gateway")
