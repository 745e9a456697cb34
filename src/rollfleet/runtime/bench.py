"""`rollfleet bench`: placeholder until the sync benchmark lands."""


def add_command(sub, func) -> None:
    pass
