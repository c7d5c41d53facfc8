"""An app written for fal's hosted endpoint, unchanged: only its environment (FAL_KEY, FAL_RUN_HOST,
FAL_QUEUE_RUN_HOST, SSL_CERT_FILE) sends it to llava-serve. Prints what it got, as JSON."""

import asyncio
import json

import fal_client
from PIL import Image

APP = "fal-ai/llavav15-13b"
arguments = {
    "prompt": "Who drew this?",
    "image_url": fal_client.encode_image(Image.new("RGB", (64, 48), (200, 30, 60))),
    "max_new_tokens": 8,
}
updates = []
out = {
    "run": fal_client.run(APP, arguments=arguments),
    "subscribe": fal_client.subscribe(APP, arguments=arguments, with_logs=True,
                                      on_queue_update=lambda u: updates.append(type(u).__name__)),
    "stream": list(fal_client.stream(APP, arguments=arguments)),
}
handle = fal_client.submit(APP, arguments=arguments)
out["result"] = handle.get()
out["status"] = type(fal_client.status(APP, handle.request_id, with_logs=True)).__name__
out["updates"] = updates
out["async_run"] = asyncio.run(fal_client.run_async(APP, arguments=arguments))
print("RESULT " + json.dumps(out))
