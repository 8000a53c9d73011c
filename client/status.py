"""What a server says about itself: liveness, readiness, metadata, its models and their signatures."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from client.transport import ClientError, ServerError, Transport, image_model_from_metadata


def server_status(connection: Transport, model_names: list[str] | None = None) -> dict:
    """A JSON-ready dict. `model_names` adds models a server without RepositoryIndex would hide."""
    metadata = connection.check_live()
    ready = connection.server_ready()
    status = {
        "url": connection.url,
        "protocol": connection.protocol,
        "live": True,
        "ready": ready,
        "server": {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)},
        "repository_index": True,
        "models": [],
    }
    entries = connection.repository_index()
    if entries is None:
        status["repository_index"] = False
        entries = []
    listed = {entry["name"] for entry in entries}
    entries += [{"name": name, "version": "", "state": "", "reason": ""} for name in model_names or [] if name not in listed]
    status["models"] = [_model_status(connection, entry) for entry in entries]
    return status


def _model_status(connection: Transport, entry: dict) -> dict:
    name = entry["name"]
    model = dict(entry)
    if entry["state"] and entry["state"] != "READY":
        model["ready"] = False  # the index already says why; metadata would only say "unknown model"
        return model
    try:
        model["ready"] = connection.model_ready(name)
        metadata = connection.model_metadata(name)
    except ServerError as error:
        model.setdefault("ready", False)
        model["error"] = error.status
        return model
    model["platform"] = metadata.platform
    model["versions"] = list(metadata.versions)
    model["inputs"] = [t.describe() for t in metadata.inputs]
    model["outputs"] = [t.describe() for t in metadata.outputs]
    try:
        image_model_from_metadata(metadata)
        model["classifier"] = True
    except ClientError:
        model["classifier"] = False  # e.g. an ensemble's averaging step: not fed images directly
    return model


def print_status(status: dict, console: Console) -> None:
    server = status["server"]
    yes_no = {True: "[green]yes[/green]", False: "[red]no[/red]"}
    console.print(
        f"server [bold]{status['url']}[/bold]: {server['name']} {server['version']} · "
        f"live {yes_no[status['live']]} · ready {yes_no[status['ready']]}"
    )
    if server["extensions"]:
        console.print(f"extensions: {', '.join(server['extensions'])}")
    if not status["repository_index"]:
        console.print("[yellow]this server has no RepositoryIndex; pass --model NAME to inspect a model[/yellow]")
    table = Table(title=f"{len(status['models'])} model(s)", title_justify="left")
    for column in ("model", "version", "state", "platform", "inputs", "outputs"):
        table.add_column(column, overflow="fold")
    notes = []
    for model in status["models"]:
        state = model.get("state") or ("READY" if model.get("ready") else "UNAVAILABLE")
        if model.get("error") or model.get("reason"):
            notes.append(f"{model['name']}: {model.get('error') or model.get('reason')}")
        style = "green" if model.get("ready") else "red"
        table.add_row(
            model["name"],
            ", ".join(model.get("versions") or [model.get("version") or "-"]),
            f"[{style}]{state}[/{style}]",
            model.get("platform", "-"),
            "\n".join(model.get("inputs", [])),
            "\n".join(model.get("outputs", [])),
        )
    console.print(table)
    for note in notes:
        console.print(f"[red]{note}[/red]", highlight=False, soft_wrap=True)
