// socket.io relay: a client joins a room with a "join" event (acknowledged), then every "m" event
// it emits is sent to every socket of that room (the sender included, as AgentChat does).
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT || 0);
const host = process.env.HOST || '127.0.0.1';
const io = new Server({ transports: ['websocket'], perMessageDeflate: false, serveClient: false,
                        maxHttpBufferSize: 1 << 20 });

io.on('connection', (socket) => {
  let room = null;
  socket.on('join', (name, ack) => {
    room = String(name);
    socket.join(room);
    if (typeof ack === 'function') ack('joined');
  });
  socket.on('m', (message) => {
    if (room !== null) io.to(room).emit('m', message);
  });
});

const httpServer = http.createServer();
io.attach(httpServer);
httpServer.listen(port, host, () => {
  console.log(`socket.io relay listening on http://${host}:${httpServer.address().port}`);
});
