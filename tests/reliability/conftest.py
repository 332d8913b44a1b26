from tests.train.conftest import world  # noqa: F401 - the toy world index, shared with the trainer tests
