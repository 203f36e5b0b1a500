"""Generate ``docs/configuration.md`` from the pydantic models in ``mii_core/config/models.py``.

    .venv/bin/python docs/gen_config_reference.py            # rewrite docs/configuration.md
    .venv/bin/python docs/gen_config_reference.py --check    # exit 1 if it is stale
    .venv/bin/python docs/gen_config_reference.py -o FILE    # write somewhere else

Names, aliases, types, defaults and constraints come from the models' pydantic
field information. Descriptions are the string literal written right after each
field (an "attribute docstring"); pydantic does not keep those unless a model sets
``use_attribute_docstrings``, so they are read from the source file with ``ast``.
"""
from __future__ import annotations

import argparse
import ast
import enum
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python docs/gen_config_reference.py` from a checkout
    sys.path.insert(0, str(ROOT))

import annotated_types  # noqa: E402  (a pydantic dependency)
from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from mii_core.config import models as config  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python docs/gen_config_reference.py"
MODELS = (config.ModelConfig, config.MIIConfig, config.GenerateParamsConfig,
          config.ReplicaConfig)
INTRO = {
    "ModelConfig": "Passed as `serve(model_config={...})`, as "
                   "`mii_config={'model_config': {...}}`, or as keyword arguments of "
                   "`mii.serve()`.",
    "MIIConfig": "Passed as `serve(mii_config={...})` or as keyword arguments of `mii.serve()`.",
    "GenerateParamsConfig": "Keyword arguments of `client(...)`, `client.generate()`, "
                            "`client.stream()`, `client.agenerate()` and `client.astream()`; "
                            "validated in the client before anything is sent, and again "
                            "by the replica.",
    "ReplicaConfig": "Entries of `ModelConfig.replica_configs`.",
}
_CONSTRAINTS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
                (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="),
                (annotated_types.MinLen, "min_length", "length >="),
                (annotated_types.MaxLen, "max_length", "length <="),
                (annotated_types.MultipleOf, "multiple_of", "multiple of"))


def attribute_docstrings(source: str) -> Dict[str, Dict[str, str]]:
    """``{class: {field: docstring}}`` for every ``field: T = ...`` followed by a string."""
    found: Dict[str, Dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        docs = found.setdefault(node.name, {})
        for field, after in zip(node.body, node.body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[field.target.id] = inspect.cleandoc(after.value.value)
    return found


def type_name(annotation: Any) -> str:
    """A short readable spelling of a (resolved) field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        inner = ", ".join(type_name(a) for a in rest)
        if len(rest) < len(args):
            return f"Optional[{inner}]" if len(rest) == 1 else f"Optional[Union[{inner}]]"
        return f"Union[{inner}]"
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        names = {list: "List", dict: "Dict", tuple: "Tuple", set: "Set"}
        base = names.get(origin, getattr(origin, "__name__", str(origin)))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"{annotation.__name__} ({', '.join(repr(m.value) for m in annotation)})"
    if annotation is Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))


def default_of(info: Any) -> str:
    """The default as users would write it, or 'required'."""
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`"


def constraints_of(model: type[BaseModel], name: str, info: Any) -> str:
    """Bounds from the field's metadata, plus the validators that check it further."""
    parts: List[str] = []
    for item in info.metadata:
        for cls, attribute, symbol in _CONSTRAINTS:
            if isinstance(item, cls):
                parts.append(f"{symbol} {getattr(item, attribute)}")
    for decorator in model.__pydantic_decorators__.field_validators.values():
        if name in decorator.info.fields:
            parts.append(f"validator `{decorator.cls_var_name}`")
    return "; ".join(dict.fromkeys(parts))


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def model_table(model: type[BaseModel], docs: Dict[str, str]) -> List[str]:
    """The section of one model: heading, intro, table of fields, model-level checks."""
    lines = [f"## {model.__name__}", "", _cell(inspect.cleandoc(model.__doc__ or "")), ""]
    if model.__name__ in INTRO:
        lines += [INTRO[model.__name__], ""]
    lines += ["| field | type | default | constraints | description |",
              "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        field = f"`{info.alias}` (attribute `{name}`)" if info.alias else f"`{name}`"
        lines.append(f"| {field} | `{_cell(type_name(info.annotation))}` | "
                     f"{_cell(default_of(info))} | {_cell(constraints_of(model, name, info))} | "
                     f"{_cell(docs.get(name, ''))} |")
    extra = model.model_config.get("extra")
    checks = [d.cls_var_name for d in model.__pydantic_decorators__.model_validators.values()]
    lines.append("")
    if extra == "forbid":
        lines.append("Unknown fields are rejected.")
    if checks:
        lines.append("Whole-model checks: " + ", ".join(f"`{c}`" for c in checks) + ".")
    return lines + [""]


def render() -> str:
    """The whole reference as Markdown."""
    source_file = Path(inspect.getsourcefile(config))
    docs = attribute_docstrings(source_file.read_text())
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from mii_core/config/models.py. Do not edit by hand: "
        "edit the models and their field docstrings, then regenerate. -->",
        f"*Generated from `mii_core/config/models.py` by `{COMMAND}`; "
        "`tests/test_docs.py` fails when this file is out of date.*",
        "",
        "Every model is importable from `mii.config`. Constraints `>`, `>=`, `<=` "
        "are pydantic field bounds; \"validator\" names a function in `mii_core/config/models.py` "
        "that checks or normalizes the value further. Fields marked \"(mii extension)\" "
        "do not exist in DeepSpeed-MII 0.3.",
        "",
    ]
    for model in MODELS:
        lines += model_table(model, docs.get(model.__name__, {}))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: List[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the reference."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
