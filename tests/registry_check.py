"""Read the hub's Schema Registry API with Confluent's own Python client
(confluent-kafka), as producers and tools would, and print what it sees
as one JSON object for the Rust test to check against the schema
directory.

usage: registry_check.py URL ACCOUNT TOKEN SUBJECT RECORD_JSON

SUBJECT and RECORD_JSON (a payload of the subject's latest version) drive
a serializer round trip: Confluent's AvroSerializer, configured to use the
latest version and never to register, frames the record with the id the
hub serves, and AvroDeserializer reads it back by that id.
"""

import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

url, account, token, subject, record = sys.argv[1:6]
client = SchemaRegistryClient({"url": url, "basic.auth.user.info": f"{account}:{token}"})
out = {"subjects": {}}

for name in client.get_subjects():
    latest = client.get_latest_version(name)
    by_id = client.get_schema(latest.schema_id)
    found = client.lookup_schema(name, Schema(latest.schema.schema_str, "AVRO"))
    fields = json.loads(latest.schema.schema_str)["fields"]
    optional = dict(json.loads(latest.schema.schema_str))
    optional["fields"] = fields + [{"name": "added_by_test", "type": ["null", "string"], "default": None}]
    required = dict(optional)
    required["fields"] = fields + [{"name": "added_by_test", "type": "long"}]
    out["subjects"][name] = {
        "versions": client.get_versions(name),
        "latest": {"id": latest.schema_id, "version": latest.version, "schema": latest.schema.schema_str},
        "version_1_id": client.get_version(name, 1).schema_id,
        "by_id_is_latest": by_id.schema_str == latest.schema.schema_str,
        "lookup_version": found.version,
        "compatibility": client.get_compatibility(name),
        "optional_field_compatible": client.test_compatibility(name, Schema(json.dumps(optional), "AVRO")),
        "required_field_compatible": client.test_compatibility(name, Schema(json.dumps(required), "AVRO")),
    }

# A schema the client has not seen (it answers one it looked up from its
# cache without asking): the registry must refuse it.
latest = json.loads(out["subjects"][subject]["latest"]["schema"])
latest["doc"] = "a version registered over the API"
try:
    client.register_schema(subject, Schema(json.dumps(latest), "AVRO"))
    out["register"] = "registered"
except SchemaRegistryError as e:
    out["register"] = {"http_status": e.http_status_code, "error_code": e.error_code}

try:
    SchemaRegistryClient({"url": url, "basic.auth.user.info": f"{account}:wrong"}).get_subjects()
    out["wrong_token"] = "answered"
except SchemaRegistryError as e:
    out["wrong_token"] = {"http_status": e.http_status_code}

ctx = SerializationContext("events", MessageField.VALUE)
conf = {"auto.register.schemas": False, "use.latest.version": True,
        "subject.name.strategy": lambda _ctx, _record_name: subject}
framed = AvroSerializer(client, conf=conf)(json.loads(record), ctx)
back = AvroDeserializer(client)(framed, ctx)
out["framed"] = {"magic": framed[0], "id": int.from_bytes(framed[1:5], "big"),
                 "user_id": back["user_id"], "outcome": back["outcome"], "attempt": back["attempt"]}
print(json.dumps(out))
