"""The admin API: ``corral fleet`` and ``corral policy`` over HTTP, for admin keys only.

| request | does |
|---|---|
| ``GET /admin/instances`` | every instance: registry row (``config``) and live state |
| ``GET /admin/instances/{name}`` | one of them |
| ``POST /admin/instances`` | add one (body: the registry fields) → 201 |
| ``PATCH /admin/instances/{name}`` | change the fields given |
| ``POST /admin/instances/{name}/drain``, ``/undrain`` | stop / resume new jobs |
| ``DELETE /admin/instances/{name}?wait=S&force=true`` | remove it (409 while jobs hold slots) |
| ``GET /admin/classes`` | the global rate and every agent class with its limits |
| ``GET /admin/classes/{name}`` | one of them |
| ``PUT /admin/classes/{name}`` | create it (201) or replace it (body: the class's fields) |
| ``PATCH /admin/classes/{name}`` | change the fields given (null lifts a limit) |
| ``DELETE /admin/classes/{name}`` | remove it (409 if the settings file has it) |
| ``GET``, ``PUT /admin/global-rate`` | ``{"global_rate_per_minute": X or null}`` |

A key is an admin key when created with ``corral keys add --admin``; any other key gets 403,
no key 401 (the auth middleware). With ``CORRAL_GATEWAY_AUTH=false`` nobody is admin.
Changes apply live, exactly as from the CLI (``app.fleet.admin``, ``app.fleet.policy_admin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from app.fleet.admin import Applied, FleetAdmin, FleetConflict
from app.fleet.policy_admin import PolicyAdmin, PolicyConflict, reason
from app.fleet.policy_store import PolicyStore, UnknownClass
from app.fleet.registry import InstanceExists, UnknownInstance
from app.gateway.errors import GatewayError
from app.gateway.services import services
from app.settings import AgentClass, InstanceConfig

#: Longest ``?wait=`` a DELETE may hold a gateway thread for.
MAX_WAIT = 60.0


async def require_admin(request: Request) -> None:
    if services(request).keys is None:
        raise GatewayError(
            403,
            "the admin API needs API keys, and they are off (CORRAL_GATEWAY_AUTH=false)",
            code="admin_required",
        )
    key = request.state.key
    if not key.admin:
        raise GatewayError(
            403,
            f"API key {key.prefix}... (agent {key.agent}) is not an admin key; create one with"
            " `corral keys add --admin ...`",
            code="admin_required",
        )


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

T = TypeVar("T")


class _Changes(BaseModel):
    """The base of a PATCH body: a misspelt field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


def _changes(name: str, model: type[BaseModel], *, skip: str | None = None) -> type[_Changes]:
    """A PATCH body for ``model``: each of its fields (but ``skip``) optional, default None."""
    fields: dict[str, Any] = {}
    for field_name, field in model.model_fields.items():
        if field_name != skip:
            assert field.annotation is not None  # every field of a model class is annotated
            fields[field_name] = (field.annotation | None, None)
    return create_model(name, __base__=_Changes, **fields)


class NewInstance(InstanceConfig):
    """The body of ``POST /admin/instances``: a misspelt field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


if TYPE_CHECKING:
    # Models built at run time are no types to mypy: it sees their base.
    InstanceChanges = _Changes
    ClassChanges = _Changes
else:
    #: The body of ``PATCH /admin/instances/{name}``: any registry field but the name.
    InstanceChanges = _changes("InstanceChanges", InstanceConfig, skip="name")
    #: The body of ``PATCH /admin/classes/{name}``: any field of a class; null lifts a limit.
    ClassChanges = _changes("ClassChanges", AgentClass)


async def _run(request: Request, change: Callable[[FleetAdmin], T]) -> T:
    """Run ``change`` in the gateway's thread pool; its refusals as HTTP errors."""
    svc = services(request)
    try:
        return await svc.jobs.blocking(change, svc.fleet_admin)
    except UnknownInstance as exc:
        raise GatewayError(404, str(exc), code="unknown_instance") from None
    except (InstanceExists, FleetConflict) as exc:
        raise GatewayError(409, str(exc), code="conflict") from None
    except ValueError as exc:  # a field out of range (pydantic's ValidationError)
        raise GatewayError(400, str(exc)) from None


def _shown(admin: FleetAdmin, applied: Applied) -> dict[str, Any]:
    return admin.view(applied.config.name).as_dict() | {"note": applied.note}


def _enabled(admin: FleetAdmin, name: str, enabled: bool) -> dict[str, Any]:
    admin.set_enabled(name, enabled)
    return admin.view(name).as_dict()


@router.get("/instances")
async def list_instances(request: Request) -> dict[str, Any]:
    return await _run(request, lambda a: {"instances": [v.as_dict() for v in a.views()]})


@router.get("/instances/{name}")
async def get_instance(request: Request, name: str) -> dict[str, Any]:
    return await _run(request, lambda a: a.view(name).as_dict())


@router.post("/instances", status_code=201)
async def add_instance(request: Request, body: NewInstance) -> dict[str, Any]:
    config = InstanceConfig.model_validate(body.model_dump())
    return await _run(request, lambda a: _shown(a, a.add(config)))


@router.patch("/instances/{name}")
async def update_instance(request: Request, name: str, body: InstanceChanges) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    return await _run(request, lambda a: _shown(a, a.update(name, **changes)))


@router.post("/instances/{name}/drain")
async def drain_instance(request: Request, name: str) -> dict[str, Any]:
    return await _run(request, lambda a: _enabled(a, name, False))


@router.post("/instances/{name}/undrain")
async def undrain_instance(request: Request, name: str) -> dict[str, Any]:
    return await _run(request, lambda a: _enabled(a, name, True))


@router.delete("/instances/{name}")
async def remove_instance(
    request: Request,
    name: str,
    wait: float = Query(0.0, ge=0, le=MAX_WAIT, description="seconds to wait for its jobs"),
    force: bool = Query(False, description="remove it even with jobs in flight"),
) -> dict[str, Any]:
    moved = await _run(request, lambda a: a.remove(name, wait=wait, force=force))
    return {"removed": name, "requeued": moved}


# Agent classes and the global rate ----------------------------------------------------------


class GlobalRate(BaseModel):
    """The body of ``PUT /admin/global-rate``; null lifts the global limit."""

    model_config = ConfigDict(extra="forbid")

    global_rate_per_minute: float | None = Field(gt=0)


async def _policy(request: Request, change: Callable[[PolicyAdmin], T]) -> T:
    """Run ``change`` in the gateway's thread pool; its refusals as HTTP errors. The database
    was migrated and seeded at the gateway's start (``FleetAdmin.ready``)."""
    svc = services(request)
    admin = PolicyAdmin(PolicyStore(svc.settings.database_url, svc.settings.namespace))
    try:
        return await svc.jobs.blocking(change, admin)
    except UnknownClass as exc:
        raise GatewayError(404, str(exc), code="unknown_class") from None
    except PolicyConflict as exc:
        raise GatewayError(409, str(exc), code="conflict") from None
    except ValueError as exc:  # a name or a field out of range
        raise GatewayError(400, reason(exc)) from None


def _classes(admin: PolicyAdmin) -> dict[str, Any]:
    return {
        "global_rate_per_minute": admin.global_rate(),
        "classes": [v.as_dict() for v in admin.views()],
    }


def _put(admin: PolicyAdmin, name: str, config: AgentClass) -> tuple[bool, dict[str, Any]]:
    created = admin.put(name, config)
    return created, admin.view(name).as_dict()


def _patch(admin: PolicyAdmin, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    admin.update(name, **changes)
    return admin.view(name).as_dict()


@router.get("/classes")
async def list_classes(request: Request) -> dict[str, Any]:
    return await _policy(request, _classes)


@router.get("/classes/{name}")
async def get_class(request: Request, name: str) -> dict[str, Any]:
    return await _policy(request, lambda a: a.view(name).as_dict())


@router.put("/classes/{name}")
async def put_class(
    request: Request, response: Response, name: str, body: AgentClass
) -> dict[str, Any]:
    created, shown = await _policy(request, lambda a: _put(a, name, body))
    if created:
        response.status_code = 201
    return shown


@router.patch("/classes/{name}")
async def update_class(request: Request, name: str, body: ClassChanges) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    return await _policy(request, lambda a: _patch(a, name, changes))


@router.delete("/classes/{name}")
async def remove_class(request: Request, name: str) -> dict[str, Any]:
    await _policy(request, lambda a: a.remove(name))
    return {"removed": name}


@router.get("/global-rate")
async def get_global_rate(request: Request) -> dict[str, Any]:
    rate = await _policy(request, lambda a: a.global_rate())
    return {"global_rate_per_minute": rate}


@router.put("/global-rate")
async def put_global_rate(request: Request, body: GlobalRate) -> dict[str, Any]:
    rate = await _policy(request, lambda a: a.set_global_rate(body.global_rate_per_minute))
    return {"global_rate_per_minute": rate}
