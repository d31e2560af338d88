"""Secure aggregation's phases (ARCHITECTURE.md, "Secure aggregation"): a device advertises its
keys, reads its neighbourhood, deals its shares, reads its inbox and the unmask request, and
reveals. Each PUT answers 201 when new and 200 when the same body was taken before."""

from __future__ import annotations

from fastapi import APIRouter, Response

from cloud.api.bodies import CLIENT_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS, ERRORS_422, ClientId, Coord, CurrentClient, RoundNo, RunId
from common.secagg.wire import Inbox, KeyAdvert, Neighbourhood, Reveal, ShareBundle, UnmaskRequest

router = APIRouter(prefix="/v1/runs/{run_id}/rounds/{number}/secagg", tags=["secure aggregation"],
                   route_class=GuardedRoute)


def _taken(response: Response, new: bool) -> dict[str, bool]:
    """201 for a new message, 200 for the same one sent again."""
    response.status_code = 201 if new else 200
    return {"accepted": True, "duplicate": not new}


@router.put("/keys/{client_id}", status_code=201, responses=ERRORS_422)
@body_rule(CLIENT_JSON)
def advertise_keys(run_id: RunId, number: RoundNo, client_id: ClientId, advert: KeyAdvert, response: Response,
                   coord: Coord, client: CurrentClient) -> dict[str, bool]:
    """Phase keys: this device's two public keys for the round."""
    return _taken(response, coord.secagg.advertise(client, run_id, number, client_id, advert))


@router.get("/neighbourhood", responses=ERRORS)
def neighbourhood(run_id: RunId, number: RoundNo, coord: Coord, client: CurrentClient) -> Neighbourhood:
    """From phase shares: this device's neighbours, their public keys and the sharing threshold."""
    return coord.secagg.neighbourhood(client, run_id, number)


@router.put("/shares/{client_id}", status_code=201, responses=ERRORS_422)
@body_rule(CLIENT_JSON)
def deal_shares(run_id: RunId, number: RoundNo, client_id: ClientId, bundle: ShareBundle, response: Response,
                coord: Coord, client: CurrentClient) -> dict[str, bool]:
    """Phase shares: one encrypted share for each neighbour, with its commitments."""
    return _taken(response, coord.secagg.deal(client, run_id, number, client_id, bundle))


@router.get("/inbox", responses=ERRORS)
def inbox(run_id: RunId, number: RoundNo, coord: Coord, client: CurrentClient) -> Inbox:
    """From phase collecting: the neighbours that dealt shares, and the shares dealt to this device."""
    return coord.secagg.inbox(client, run_id, number)


@router.get("/unmask", responses=ERRORS)
def unmask_request(run_id: RunId, number: RoundNo, coord: Coord, client: CurrentClient) -> UnmaskRequest:
    """From phase unmasking: which neighbours' seed shares and which masking-key shares to reveal."""
    return coord.secagg.unmask_request(client, run_id, number)


@router.put("/reveals/{client_id}", status_code=201, responses=ERRORS_422)
@body_rule(CLIENT_JSON)
def reveal(run_id: RunId, number: RoundNo, client_id: ClientId, body: Reveal, response: Response, coord: Coord,
           client: CurrentClient) -> dict[str, bool]:
    """Phase unmasking: the shares the unmask request asked for, each checked against its commitment."""
    return _taken(response, coord.secagg.reveal(client, run_id, number, client_id, body))
