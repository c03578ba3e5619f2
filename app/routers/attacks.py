"""The attack catalogue, with JSON Schemas generated from the models that validate requests."""

from __future__ import annotations

from fastapi import APIRouter

from attacks.catalogue import CATALOGUE, AttackInfo, UnknownAttackError, get_attack
from app.problems import Problem, problem_responses
from app.schemas import AttackPublic, AttacksPublic

router = APIRouter(prefix="/v1/attacks", tags=["attacks"], responses=problem_responses(404))


def attack_public(a: AttackInfo) -> AttackPublic:
    return AttackPublic(name=a.name, title=a.title, description=a.description, paper=a.paper,
                        takes_beta=a.takes_beta, stage=a.stage, params_schema=a.params_model.model_json_schema())


@router.get("", response_model=AttacksPublic)
def list_attacks() -> AttacksPublic:
    """Every attack with its description, paper reference and parameter JSON Schema."""
    data = [attack_public(a) for a in sorted(CATALOGUE.values(), key=lambda a: a.name)]
    return AttacksPublic(data=data, count=len(data))


@router.get("/{name}", response_model=AttackPublic)
def read_attack(name: str) -> AttackPublic:
    """One attack of the catalogue."""
    try:
        return attack_public(get_attack(name))
    except UnknownAttackError as exc:
        raise Problem(404, str(exc), valid=exc.valid) from None
