"""python-socketio relay on aiohttp (uvloop): ``join`` (acknowledged) puts a client in a room, then
every ``m`` event it emits is sent to every client of that room, the sender included."""

from __future__ import annotations

import os

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], cors_allowed_origins=None,
                           max_http_buffer_size=1 << 20)
app = web.Application()
sio.attach(app)
rooms: dict[str, str] = {}


@sio.event
async def join(sid: str, room: str) -> str:
    rooms[sid] = str(room)
    await sio.enter_room(sid, str(room))
    return "joined"


@sio.on("m")
async def relay(sid: str, message: object) -> None:
    room = rooms.get(sid)
    if room is not None:
        await sio.emit("m", message, room=room)


@sio.event
async def disconnect(sid: str, *args: object) -> None:
    rooms.pop(sid, None)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "0"))
    print(f"python-socketio relay listening on http://{host}:{port}", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
