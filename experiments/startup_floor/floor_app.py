"""Empty ServerApp and ClientApp: one census round trip, nothing else.

The ServerApp waits for `num-nodes` SuperNodes, sends each an empty query, and when all
replied writes the wall-clock time to `<output-dir>/<run-name>/ready.json`.
"""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    wanted = int(context.run_config["num-nodes"])
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted:
        time.sleep(0.05)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(messages))
    if len(replies) != len(nodes) or any(r.has_error() for r in replies):
        raise RuntimeError(f"{len(replies)} replies from {len(nodes)} nodes, or errors")
    folder = Path(str(context.run_config["output-dir"])) / str(context.run_config["run-name"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ready.json").write_text(json.dumps({"ready_at": time.time()}))
