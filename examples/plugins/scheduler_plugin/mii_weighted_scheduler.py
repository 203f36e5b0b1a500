"""``weighted_round_robin``: replicas get requests in proportion to weights.

    MII_REPLICA_WEIGHTS=3,1 python app.py   # app calls mii.serve(..., replica_num=2,
                                            #     scheduler="weighted_round_robin")

Replica 0 then gets 3 of every 4 requests. The weights are read from the environment
of the load-balancer process, which inherits it from the process that called serve().
"""
import os

from mii.errors import ConfigError
from mii.plugins import hookimpl

ENV = "MII_REPLICA_WEIGHTS"


def replica_weights(count):
    """One weight per replica from ``$MII_REPLICA_WEIGHTS``; replicas not listed weigh 1."""
    text = os.environ.get(ENV, "")
    try:
        weights = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{ENV}={text!r}: expected comma-separated integers") from None
    if len(weights) > count or any(weight < 1 for weight in weights):
        raise ConfigError(f"{ENV}={text!r}: give at most {count} weights, each >= 1")
    return weights + [1] * (count - len(weights))


class WeightedRoundRobinScheduler:
    """nginx's smooth weighted round-robin: each replica's share is spread out evenly."""

    name = "weighted_round_robin"

    def __init__(self, replica_count):
        self.weights = replica_weights(replica_count)
        self.credit = [0] * replica_count

    def pick(self, candidates):
        """Called in the load balancer for each request; ``candidates`` are healthy replicas."""
        for replica in candidates:
            self.credit[replica] += self.weights[replica]
        chosen = max(candidates, key=lambda replica: (self.credit[replica], -replica))
        self.credit[chosen] -= sum(self.weights[replica] for replica in candidates)
        return chosen

    def started(self, replica):
        """Nothing to track: the weights alone decide."""

    def finished(self, replica):
        """Nothing to track: the weights alone decide."""


@hookimpl
def mii_validate_config(mii_config):
    """In the serve() caller: a bad $MII_REPLICA_WEIGHTS fails before any process starts."""
    if mii_config.scheduler == WeightedRoundRobinScheduler.name:
        replica_weights(mii_config.model_conf.replica_num)
