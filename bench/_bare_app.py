"""The bare baseline for `bench/receiver.py`: a Flask JSON endpoint with no token, schema, database or queue."""
from flask import Flask, jsonify, request

app = Flask("bare")


@app.post("/optimove/events")
def receive():
    """Decode the JSON body and answer 202, as the listener does when it accepts a notification."""
    request.get_json()
    return jsonify(status="accepted"), 202
