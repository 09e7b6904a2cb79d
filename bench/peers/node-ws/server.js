// Raw WebSocket relay: a client's first message names its room; every later message is relayed
// as it is to every socket of that room (the sender included, so fan-out equals AgentChat's).
// No auth, no sequence numbers, no persistence: the practical limit of a Node relay.
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 0);
const host = process.env.HOST || '127.0.0.1';
const rooms = new Map();
const wss = new WebSocketServer({ host, port, perMessageDeflate: false, maxPayload: 1 << 20 });

wss.on('connection', (socket) => {
  let room = null;
  socket.on('message', (data, isBinary) => {
    if (room === null) {
      const name = data.toString();
      room = rooms.get(name);
      if (room === undefined) {
        room = new Set();
        rooms.set(name, room);
      }
      room.add(socket);
      socket.send('joined');
      return;
    }
    for (const peer of room) {
      peer.send(data, { binary: isBinary });
    }
  });
  socket.on('close', () => {
    if (room !== null) room.delete(socket);
  });
});

wss.on('listening', () => {
  console.log(`node-ws relay listening on ws://${host}:${wss.address().port}`);
});
