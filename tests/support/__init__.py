"""What the tests share: servers, clients, credentials, polling, processes. Import the module you need.

Conventions (see docs/architecture.md, Tests):

- Async: a test that needs an event loop is an ``async def test_...``; the root
  conftest runs each in a fresh loop of its own (``asyncio.run``) under a hard
  timeout, so a hung server fails the test, not the suite. No test calls
  ``asyncio.run`` itself.
- Waiting: `poll.eventually` (``await`` it in async tests) and
  `poll.eventually_sync` (threaded tests) poll a condition until a deadline
  and fail with what was awaited. No other polling loops.
- Time: core logic runs on `meshca.testing.FrozenClock`; a served server runs
  on `clocks.MovableClock` (real time plus an offset the test moves), because
  TLS peers check certificates against the real clock. A test never sleeps to
  show that something does not happen where a clock can show it.
- conftest files only declare fixtures (and the root one the async hook);
  no test imports a conftest module.

Modules: ``ids`` (names), ``clocks``, ``poll``, ``certs`` (keys, CSRs,
certificate fields), ``tokens`` (join tokens, Kubernetes JWTs), ``calls``
(gRPC requests and statuses), ``metrics``, ``serving`` (in-process servers),
``tls`` (TLS peers), ``fake_identity``, ``procs`` (the ``meshca`` console
script), ``kubeapi``, ``pg``, ``certbuild``, ``malformed``.
"""
