"""A deployment takes the sites' replies in hospital order (site 0, 1, 2: the simulator's order), whatever
order they arrive in: the failure it reports first and the order of a round's dropped sites are the
simulator's. Sites answer in process, as in test_flower.py, whose helpers build the run."""

import pytest

from hsl_lightning.errors import HSLError
from hsl_lightning.flower import protocol
from hsl_lightning.flower.server import LocalSites
from hsl_lightning.flower.site import Site

from test_flower import config_for, deploy, sites_for


class SitesOneAndTwoFail(Site):
    """Sites 1 and 2 fail their training of round 1."""

    def handle(self, request):
        if isinstance(request, protocol.Round) and request.train and request.completed == 0 and self.node in (1, 2):
            raise HSLError(f"Site {self.name}: local training failed in round 1: out of memory")
        return super().handle(request)


class LastSiteAnswersFirst(LocalSites):
    """The replies arrive in reverse hospital order (site 2's first), as they may over the network."""

    def exchange(self, requests, timeout_s):
        return dict(reversed(super().exchange(requests, timeout_s).items()))


def test_replies_are_taken_in_hospital_order_whatever_order_they_arrive_in(tmp_path):
    """Two sites fail in one round: the run stops naming site 1, as the simulator names node1, although
    site 2's failure arrived first."""
    config = config_for("fedavg", rounds=1)
    transport = LastSiteAnswersFirst(sites_for(config, tmp_path / "sites", SitesOneAndTwoFail))
    with pytest.raises(HSLError, match=r"site 1 \(site1\) failed in round 1: local training failed"):
        deploy(config, tmp_path / "run", transport)
