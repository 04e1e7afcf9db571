#!/usr/bin/env python3
"""A few Kinesis and DynamoDB calls against the local emulators (scripts/emulators.sh), with no
AWS CLI or SDK: the quick start uses it to create streams, write and read records and show the
lease table.

Usage:
  aws_local.py create-stream NAME [--shards N]   create a stream and wait until it is ACTIVE
  aws_local.py wait-active NAME                  wait (30 s at most) until a stream is ACTIVE
  aws_local.py put NAME FILE.jsonl               write records, one JSON object a line
  aws_local.py read-all NAME [--table]           print every record of every shard
  aws_local.py scan-table TABLE [--json]         print a lease table (or any DynamoDB table)

Endpoints come from --kinesis URL / --dynamodb URL, else from KINESIS_ENDPOINT / DYNAMODB_ENDPOINT
(the lines `scripts/emulators.sh start` prints). Only loopback endpoints are accepted: this talks
to emulators, never to AWS. Requests carry a syntactically valid but unsigned SigV4 header (the
emulators require one and do not check it). --region (default us-east-1) goes into that header.

`put` reads the format of `kinesis-host replay`: `partition_key`, `text` or base64 `data`, and
optionally `explicit_hash_key` or `shard_id`; a `shard_id` that names one of the stream's shards
becomes that shard's starting hash key, so the record lands in that shard.

`read-all` prints one JSON line per record, in shard order:
  {"shard_id": ..., "sequence_number": ..., "partition_key": ..., "data": <base64>, "text": ...}
("text" only when the data is UTF-8), or with --table one aligned line per record: shard,
partition key and data (as text, or base64).

`scan-table` prints one aligned line per item, KCL's lease attributes first ("-" when absent) and
without the shards' hash key ranges; --json prints the items as DynamoDB returns them.
"""

import argparse
import base64
import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_SECS = 10
ACTIVE_WAIT_SECS = 30
# No proxies: the emulators are on this machine.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Failure(Exception):
    pass


def loopback(url, what):
    parsed = urllib.parse.urlparse(url or "")
    host = parsed.hostname or ""
    ok = parsed.scheme == "http" and (host == "localhost" or is_loopback_ip(host))
    if not ok:
        raise Failure(f"{what} endpoint must be http:// on a loopback address, not {url!r}")
    return url.rstrip("/") + "/"


def is_loopback_ip(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def call(endpoint, service, target, body, region):
    """POSTs one JSON-protocol request; returns the decoded response or raises Failure."""
    content_type, prefix, scope = {
        "kinesis": ("application/x-amz-json-1.1", "Kinesis_20131202", "kinesis"),
        "dynamodb": ("application/x-amz-json-1.0", "DynamoDB_20120810", "dynamodb"),
    }[service]
    headers = {
        "Content-Type": content_type,
        "X-Amz-Target": f"{prefix}.{target}",
        "X-Amz-Date": "20260101T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 "
        f"Credential=test/20260101/{region}/{scope}/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=0",
    }
    request = urllib.request.Request(
        endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with OPENER.open(request, timeout=TIMEOUT_SECS) as response:
            text = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            parsed = json.loads(detail)
            kind = str(parsed.get("__type", "")).rsplit("#", 1)[-1]
            message = parsed.get("message") or parsed.get("Message") or ""
            detail = f"{kind}: {message}".strip(": ")
        except ValueError:
            pass
        raise Failure(f"{service} {target} failed (HTTP {e.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Failure(f"{service} {target}: cannot reach {endpoint}: {e}") from None
    return json.loads(text) if text else {}


def kinesis(args, target, body):
    return call(args.kinesis, "kinesis", target, body, args.region)


def dynamodb(args, target, body):
    return call(args.dynamodb, "dynamodb", target, body, args.region)


def wait_active(args, name):
    deadline = time.monotonic() + ACTIVE_WAIT_SECS
    while True:
        summary = kinesis(args, "DescribeStreamSummary", {"StreamName": name})
        status = summary["StreamDescriptionSummary"]["StreamStatus"]
        if status == "ACTIVE":
            return
        if time.monotonic() > deadline:
            raise Failure(f"stream {name} is still {status} after {ACTIVE_WAIT_SECS} s")
        time.sleep(0.1)


def list_shards(args, name):
    shards, body = [], {"StreamName": name}
    while True:
        out = kinesis(args, "ListShards", body)
        shards.extend(out.get("Shards", []))
        token = out.get("NextToken")
        if not token:
            return shards
        body = {"NextToken": token}


def cmd_create_stream(args):
    kinesis(args, "CreateStream", {"StreamName": args.name, "ShardCount": args.shards})
    wait_active(args, args.name)
    shards = "1 shard" if args.shards == 1 else f"{args.shards} shards"
    print(f"created stream {args.name} ({shards})", file=sys.stderr)


def cmd_wait_active(args):
    wait_active(args, args.name)


def cmd_put(args):
    starts = {
        s["ShardId"]: s["HashKeyRange"]["StartingHashKey"] for s in list_shards(args, args.name)
    }
    count = 0
    with open(args.file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{args.file}:{number}"
            try:
                record = json.loads(line)
                key = record["partition_key"]
                if "text" in record:
                    data = record["text"].encode()
                else:
                    data = base64.b64decode(record["data"], validate=True)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise Failure(f"{where}: not a record ({e})") from None
            body = {
                "StreamName": args.name,
                "PartitionKey": key,
                "Data": base64.b64encode(data).decode(),
            }
            hash_key = record.get("explicit_hash_key")
            shard = record.get("shard_id")
            if hash_key is None and shard is not None:
                if shard not in starts:
                    raise Failure(f"{where}: stream {args.name} has no shard {shard}")
                hash_key = starts[shard]
            if hash_key is not None:
                body["ExplicitHashKey"] = str(hash_key)
            kinesis(args, "PutRecord", body)
            count += 1
    print(f"wrote {count} records to {args.name}", file=sys.stderr)


def cmd_read_all(args):
    rows = [("shard", "partition key", "data")]
    for shard in list_shards(args, args.name):
        shard_id = shard["ShardId"]
        out = kinesis(
            args,
            "GetShardIterator",
            {"StreamName": args.name, "ShardId": shard_id, "ShardIteratorType": "TRIM_HORIZON"},
        )
        iterator = out.get("ShardIterator")
        while iterator:
            out = kinesis(args, "GetRecords", {"ShardIterator": iterator, "Limit": 10000})
            records = out.get("Records", [])
            for r in records:
                data = base64.b64decode(r["Data"])
                line = {
                    "shard_id": shard_id,
                    "sequence_number": r["SequenceNumber"],
                    "partition_key": r["PartitionKey"],
                    "data": r["Data"],
                }
                try:
                    line["text"] = data.decode("utf-8")
                except UnicodeDecodeError:
                    pass
                if args.table:
                    rows.append((shard_id, line["partition_key"], line.get("text", line["data"])))
                else:
                    print(json.dumps(line, ensure_ascii=False))
            # An open shard never ends: stop at the first empty read at the tip.
            if not records and out.get("MillisBehindLatest", 0) == 0:
                break
            iterator = out.get("NextShardIterator")
    if args.table:
        print_table(rows)
        if len(rows) == 1:
            print(f"(stream {args.name} is empty)")


def print_table(rows):
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def plain(value):
    """A DynamoDB attribute value as text."""
    (kind, v), = value.items()
    if kind in ("SS", "NS"):
        return ",".join(sorted(v))
    if kind == "BOOL":
        return str(v).lower()
    return str(v)


def cmd_scan_table(args):
    items, body = [], {"TableName": args.table, "ConsistentRead": True}
    while True:
        out = dynamodb(args, "Scan", body)
        items.extend(out.get("Items", []))
        last = out.get("LastEvaluatedKey")
        if not last:
            break
        body["ExclusiveStartKey"] = last
    items.sort(key=lambda i: plain(i.get("leaseKey", {"S": ""})))
    if args.json:
        for item in items:
            print(json.dumps(item))
        return
    # KCL's attributes first, in a fixed order; anything else after them.
    preferred = [
        "leaseKey",
        "leaseOwner",
        "leaseCounter",
        "checkpoint",
        "checkpointSubSequenceNumber",
        "ownerSwitchesSinceCheckpoint",
        "parentShardId",
        "childShardIds",
    ]
    present = {name for item in items for name in item}
    always = {"leaseKey", "leaseOwner", "leaseCounter", "checkpoint"}
    columns = [c for c in preferred if c in present or c in always] + sorted(
        present - set(preferred) - {"startingHashKey", "endingHashKey"}
    )
    if not items:
        print(f"(table {args.table} is empty)")
        return
    print_table([columns] + [[plain(i[c]) if c in i else "-" for c in columns] for i in items])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinesis", default=os.environ.get("KINESIS_ENDPOINT"))
    parser.add_argument("--dynamodb", default=os.environ.get("DYNAMODB_ENDPOINT"))
    parser.add_argument("--region", default="us-east-1")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-stream")
    p.add_argument("name")
    p.add_argument("--shards", type=int, default=1)
    p.set_defaults(run=cmd_create_stream, needs="kinesis")
    p = commands.add_parser("wait-active")
    p.add_argument("name")
    p.set_defaults(run=cmd_wait_active, needs="kinesis")
    p = commands.add_parser("put")
    p.add_argument("name")
    p.add_argument("file")
    p.set_defaults(run=cmd_put, needs="kinesis")
    p = commands.add_parser("read-all")
    p.add_argument("name")
    p.add_argument("--table", action="store_true")
    p.set_defaults(run=cmd_read_all, needs="kinesis")
    p = commands.add_parser("scan-table")
    p.add_argument("table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_scan_table, needs="dynamodb")
    args = parser.parse_args()
    try:
        if args.needs == "kinesis":
            args.kinesis = loopback(args.kinesis, "Kinesis (--kinesis or KINESIS_ENDPOINT)")
        else:
            args.dynamodb = loopback(args.dynamodb, "DynamoDB (--dynamodb or DYNAMODB_ENDPOINT)")
        args.run(args)
    except Failure as e:
        print(f"aws_local.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
