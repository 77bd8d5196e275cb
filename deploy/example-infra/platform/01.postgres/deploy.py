from invoke import task

from libs import deploy


@task
def sync(c):
    """Deploy this service when its config hash changed."""
    deploy.sync(__file__)
