from invoke import task

from libs.fixture_sync import run_sync


@task
def sync(c):
    """Deploy this service (records the run for the tests)."""
    run_sync(__file__)
