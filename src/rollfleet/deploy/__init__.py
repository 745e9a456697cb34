"""rollfleet on a Kubernetes cluster: `rollfleet deploy | diff | status | logs | down`.

- client.py: the API server as plain dicts (the `kubernetes` dynamic client), kubeconfig and errors;
- fleet.py: what the objects say (worker groups, Secrets, runtime config), read from the objects;
- preflight.py: read-only checks before anything is applied;
- watch.py: waiting for the fleet, and the reasons pods and events give;
- commands.py: the subcommands and their flags.
"""
