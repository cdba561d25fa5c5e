"""Function tools in harmony's developer message: JSON schemas written as TypeScript types.

A port of openai-harmony 0.0.8's `template_tools_section` and `json_schema_to_typescript`
(src/encoding.rs), line for line, so a conversation with tools renders to harmony's own ids
(tests/test_chat_data.py checks it against the library). Descriptions become `//` comments above
each field, optional fields end in `?`, and every function returns `any`.
"""

import json

NAMESPACE = "functions"  # harmony's namespace for function tools: recipients `functions.<name>`
# Appended to the system message's channel line when the developer message defines functions.
CHANNEL_RULE = "Calls to these tools must go to the commentary channel: 'functions'."


class ToolSpecError(ValueError):
  """A tool definition that is not an OpenAI function spec."""


def _lines(text: str) -> list[str]:
  """Rust's str::lines: split at \\n or \\r\\n (a lone \\r stays text), no empty last line."""
  lines = text.split("\n")
  ended = [line[:-1] if line.endswith("\r") else line for line in lines[:-1]]
  return ended + ([lines[-1]] if lines[-1] else [])


def _json(value) -> str:
  """serde_json's Display of a value: compact JSON."""
  return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: dict) -> bool:
  return isinstance(schema.get("enum"), list) and bool(schema["enum"])


def _default_comment(schema: dict) -> str:
  """`default: ...` as harmony writes it: a string quoted unless the schema is an enum."""
  default = schema["default"]
  if isinstance(default, str):
    return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
  return f"default: {_json(default)}"


def _nullable(schema: dict, type_text: str) -> str:
  if schema.get("nullable") is True and "null" not in type_text:
    return f"{type_text} | null"
  return type_text


def _variant_comments(variant: dict, skip_description: bool = False,
                      property_description: str | None = None) -> str:
  comments = []
  description = variant.get("description")
  if not skip_description and isinstance(description, str) and description != property_description:
    comments.append(description)
  if "default" in variant:
    comments.append(_default_comment(variant))
  return f" // {' '.join(comments)}" if comments else ""


def _object(schema: dict, indent: str) -> str:
  out = ""
  if isinstance(schema.get("description"), str):
    out += f"{indent}// {schema['description']}\n"
  out += "{\n"
  properties = schema.get("properties")
  required = {r for r in schema.get("required") or [] if isinstance(r, str)}
  for key, value in (properties.items() if isinstance(properties, dict) else ()):
    mark = "" if key in required else "?"
    if isinstance(value.get("title"), str):
      out += f"{indent}// {value['title']}\n{indent}//\n"
    one_of = value.get("oneOf")
    if one_of is None and isinstance(value.get("description"), str):
      out += f"{indent}// {value['description']}\n"
    if isinstance(value.get("examples"), list) and value["examples"]:
      out += f"{indent}// Examples:\n"
      out += "".join(f'{indent}// - "{e}"\n' for e in value["examples"] if isinstance(e, str))
    if isinstance(one_of, list):
      description = value.get("description") if isinstance(value.get("description"), str) else None
      first = one_of[0].get("description") if one_of else None
      above = description is not None and description != first
      if above:
        out += f"{indent}// {description}\n"
      if "default" in value:
        out += f"{indent}// {_default_comment(value)}\n"
      out += f"{indent}{key}{mark}:\n"
      for i, variant in enumerate(one_of):
        out += f"{indent} | " + _nullable(variant, typescript(variant, indent + "   "))
        out += _variant_comments(variant, i == 0 and above, description) + "\n"
      out += f"{indent},\n"
      continue
    out += f"{indent}{key}{mark}: " + _nullable(value, typescript(value, indent + "    ")) + ","
    if one_of is None and "default" in value:
      out += f" // {_default_comment(value)}"
    out += "\n"
  return out + f"{indent}}}"


def typescript(schema: dict, indent: str = "") -> str:
  """A JSON schema (OpenAPI style) as the TypeScript type harmony shows the model."""
  if isinstance(schema.get("oneOf"), list):
    return "".join(f"\n{indent} | " + _nullable(v, typescript(v, indent + "   "))
                   + _variant_comments(v) for v in schema["oneOf"])
  kind = schema.get("type")
  if isinstance(kind, list):
    names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
    if names:
      return " | ".join(names)
  if kind == "object":
    return _object(schema, indent)
  if kind == "string":
    values = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
    return " | ".join(values) if values else "string"
  if kind in ("number", "integer"):
    return "number"
  if kind == "boolean":
    return "boolean"
  if kind == "array":
    return f"{typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
  return "any"


def function_spec(tool, where: str) -> dict:
  """{"name", "description", "parameters" or None} of an OpenAI tool or bare function spec."""
  spec = tool.get("function", tool) if isinstance(tool, dict) else None
  if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
    raise ToolSpecError(f"{where}: a tool must be {{'type': 'function', 'function': {{'name': "
                        f"..., 'description': ..., 'parameters': {{...}}}}}}, got {tool!r}")
  parameters = spec.get("parameters")
  if parameters is not None and not isinstance(parameters, dict):
    raise ToolSpecError(f"{where}: tool {spec['name']!r} needs its parameters as a JSON schema "
                        f"object, got {parameters!r}")
  return {"name": spec["name"], "description": spec.get("description") or "",
          "parameters": parameters}


def tools_section(specs: list[dict]) -> str:
  """The developer message's `# Tools` section for function specs (see function_spec)."""
  lines = [f"## {NAMESPACE}\n", f"namespace {NAMESPACE} {{\n"]
  for spec in specs:
    lines += [f"// {line}" for line in _lines(spec["description"])]
    arguments = "" if spec["parameters"] is None else f"_: {typescript(spec['parameters'])}"
    lines.append(f"type {spec['name']} = ({arguments}) => any;\n")
  lines.append(f"}} // namespace {NAMESPACE}")
  return "# Tools\n\n" + "\n".join(lines)
