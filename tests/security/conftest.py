from tests.bad_inputs.conftest import base_workspace, ws  # noqa: F401  (the tiny workspace, copied per test)
