"""`client`: evaluate, query and inspect a model served over the KServe v2 / Triton protocol.

gRPC by default (--url HOST:PORT); HTTP/REST when --url is an http:// or https:// URL
(client/connect.py picks the transport; the reports are the same).

Works against any server speaking the protocol (ours, Triton, KServe): it reads the
model's metadata first and refuses, with one clear line, data that does not fit.
Errors print `error: ...` on stderr; exit status 1 for server/model/shape problems,
2 for a data set that cannot be read (and for bad command-line usage, as click does).
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from client.connect import connect
from client.security import security_options
from client.transport import ClientError
from ensemble_serving.datasets import DATASET_NAMES, DatasetError, load_dataset

DEFAULT_URL = "localhost:8001"
URL_ENV = "ENSEMBLE_SERVING_URL"

stdout = Console()
stderr = Console(stderr=True)

url_option = click.option(
    "--url", default=DEFAULT_URL, show_default=True, envvar=URL_ENV,
    help="The server. HOST:PORT (or grpc://HOST:PORT) speaks gRPC, Triton's port 8001; "
         "http://HOST:PORT speaks HTTP/REST, port 8000, and https://HOST:PORT the same over TLS "
         f"(env ${URL_ENV}).",
)  # fmt: skip
timeout_option = click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
    help="Seconds to wait for each request before giving up.",
)  # fmt: skip


def one_line_errors(command):
    """Print a ClientError / DatasetError as one line and exit non-zero, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ClientError as error:
            stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except DatasetError as error:
            stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            stderr.print("interrupted")
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Evaluate and query image classifiers served over the KServe v2 / Triton protocol.

    --url picks the protocol: HOST:PORT for gRPC (the default), http://HOST:PORT or
    https://HOST:PORT for HTTP/REST. Everything else works the same over both.

    \b
    client status   --url localhost:8001
    client evaluate --url localhost:8001 --model mnist --dataset mnist
    client evaluate --url http://localhost:8000 --model mnist --dataset mnist
    client predict  --url localhost:8001 --model cifar10 cat.jpg dog.png
    """


# --------------------------------------------------------------------------- evaluate


@main.command()
@click.option("--dataset", "dataset_name", type=click.Choice(DATASET_NAMES), required=True,
              help="Data set to evaluate on (the model must take its image shape).")
@url_option
@click.option("--model", "model_name", required=True, help="Model name on the server (an ensemble or a member).")
@click.option("--model-version", default="", help="Model version; empty lets the server pick (the latest).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding MNIST/raw or cifar-10-batches-py "
                   "(default: $ENSEMBLE_SERVING_DATA_DIR, else ~/.cache/ensemble-serving/data).")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Download the official files when they are absent from --data-dir.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per request.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight at once (lets the server batch and overlap work).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Also report top-k accuracy.")
@click.option("--normalize", is_flag=True,
              help="Show the confusion matrix as row fractions (recall on the diagonal) instead of counts.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write report.json, per_class.csv and confusion_matrix.png "
                   "[default: outputs/evaluate/MODEL-DATASET-SPLIT].")
@timeout_option
@security_options
@one_line_errors
def evaluate(dataset_name, url, model_name, model_version, data_dir, download, split, limit,
             batch_size, concurrency, top_k, normalize, out_dir, timeout_s, security):  # fmt: skip
    """Send a real data set through a served model and report how well it classifies.

    Reads the data set, checks the model's input shape and datatype against it, streams
    the images in batches (raw UINT8 tensors; binary tensors over HTTP) with bounded concurrency, and reports
    accuracy, top-k accuracy, per-class precision/recall/F1, the confusion matrix, mean
    confidence and calibration error (ECE), throughput and client-side latency
    percentiles. Writes report.json, per_class.csv and confusion_matrix.png to --out.
    """
    from client.report import build_report, print_report, write_report_files

    dataset = _load_dataset_with_notes(dataset_name, split, data_dir, download)
    images, labels = dataset.images[:limit], dataset.labels[:limit]
    with connect(url, timeout_s=timeout_s, security=security) as connection:
        server, model, result = _stream_dataset(connection, model_name, model_version, images, dataset.class_names,
                                                f"{dataset_name} {split}", batch_size, concurrency)  # fmt: skip
    context = {
        "model": model_name,
        "model_version": model_version,
        "platform": model.platform,
        "url": connection.url,
        "protocol": connection.protocol,
        "server": {"name": server.name, "version": server.version},
        "dataset": dataset_name,
        "split": split,
        "batch_size": result.batch_size,
        "concurrency": result.concurrency,
    }
    report = build_report(result.probabilities, labels, dataset.class_names, top_k=top_k,
                          latencies_s=result.latencies_s, wall_time_s=result.wall_time_s, context=context)  # fmt: skip
    print_report(report, stdout, normalize=normalize)
    out_dir = Path(out_dir or Path("outputs") / "evaluate" / f"{model_name}-{dataset_name}-{split}")
    written = write_report_files(report, out_dir, normalize=normalize)
    stdout.print(f"wrote {', '.join(str(path) for path in written)}", highlight=False, soft_wrap=True)


def _stream_dataset(connection, model_name, model_version, images, class_names, dataset_label,
                    batch_size, concurrency):  # fmt: skip
    """Check the model against the data set, then stream the images through it under a progress bar."""
    from client.evaluate import check_dataset_fits, effective_batch_size, stream_probabilities

    server = connection.check_live()
    model = connection.image_model(model_name, model_version)
    check_dataset_fits(model, images, class_names, dataset_label)
    if effective_batch_size(model, batch_size) < batch_size:
        stderr.print(f"[yellow]note:[/yellow] model {model_name!r} takes at most {model.max_batch_size} images "
                     f"per request (max_batch_size): sending batches of {model.max_batch_size}", highlight=False)
    with _progress_bar() as progress:
        task = progress.add_task(f"{model_name} on {dataset_label}", total=len(images))
        result = stream_probabilities(
            connection, model, images, batch_size=batch_size, concurrency=concurrency,
            on_progress=lambda count: progress.advance(task, count),
        )  # fmt: skip
    return server, model, result


def _load_dataset_with_notes(name, split, data_dir, download):
    """load_dataset, with its checksum warnings shown as one note each (not a Python warning dump)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(name, split, data_dir=data_dir, download=download)
    for warning in caught:
        stderr.print(f"[yellow]note:[/yellow] {warning.message}", highlight=False, soft_wrap=True)
    return dataset


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr,
    )  # fmt: skip


# --------------------------------------------------------------------------- predict


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@url_option
@click.option("--model", "model_name", required=True, help="Model name on the server.")
@click.option("--model-version", default="", help="Model version; empty lets the server pick (the latest).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to show per image.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False), default=None,
              help="Class names, one per line, for servers without the classification extension "
                   "(by default the server supplies names from the model's label file).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@timeout_option
@security_options
@one_line_errors
def predict(images, url, model_name, model_version, top_k, labels_path, as_json, timeout_s, security):
    """Classify image files (PNG, JPEG, ...) and show the top-k classes with their names.

    Each image is converted to the model's channels (grayscale or RGB) and resized to
    its height x width when they differ. Note that MNIST models expect white digits on
    black, as in the data set.
    """
    from client.predict import predict_images, read_labels

    labels = read_labels(labels_path) if labels_path else None
    with connect(url, timeout_s=timeout_s, security=security) as connection:
        connection.check_live()
        model = connection.image_model(model_name, model_version)
        results = predict_images(connection, model, list(images), top_k=top_k, labels=labels)
    if as_json:
        click.echo(json.dumps([result.as_dict() for result in results], indent=2))
        return
    for result in results:
        table = Table(title=result.path, title_justify="left", caption="; ".join(result.notes) or None,
                      caption_justify="left")  # fmt: skip
        for column, justify in (("rank", "right"), ("class", "left"), ("index", "right"), ("score", "right")):
            table.add_column(column, justify=justify)
        for rank, prediction in enumerate(result.top, start=1):
            table.add_row(str(rank), prediction.label, str(prediction.class_index), f"{prediction.score:.4f}")
        stdout.print(table)


# --------------------------------------------------------------------------- status


@main.command()
@url_option
@click.option("--model", "model_names", multiple=True,
              help="Also inspect this model (for servers without RepositoryIndex); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@timeout_option
@security_options
@one_line_errors
def status(url, model_names, as_json, timeout_s, security):
    """Show the server's liveness, readiness, metadata, and its models with their inputs and outputs.

    Exits 0 when the server is ready, 1 when it is not (or is unreachable), so it also
    serves as a readiness probe in scripts.
    """
    from client.status import print_status, server_status

    with connect(url, timeout_s=timeout_s, security=security) as connection:
        info = server_status(connection, list(model_names))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        print_status(info, stdout)
    if not info["ready"]:
        raise ClientError(f"server at {info['url']} is live but not ready")


if __name__ == "__main__":
    main()
