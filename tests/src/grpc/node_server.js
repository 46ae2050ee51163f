const grpc = require('@grpc/grpc-js'), fs = require('fs');
const [cert, key] = [fs.readFileSync(process.argv[2]), fs.readFileSync(process.argv[3])];
const id = x => x;
const method = (name, stream) => ({path: '/demo.Greeter/' + name, requestStream: false, responseStream: stream,
  requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id});
const server = new grpc.Server();
server.addService({SayHello: method('SayHello', false)}, {
  SayHello: (call, cb) => {
    const req = call.request.toString();
    if (req.includes('notfound')) cb({code: grpc.status.NOT_FOUND, details: 'no such greeting ERRMSG-MARK-8c2d'});
    else cb(null, Buffer.from('hello ' + req));
  },
});
server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createSsl(null, [{cert_chain: cert, private_key: key}]), (err, port) => {
  if (err) { console.error(err); process.exit(1); }
  console.log('listening ' + port);
});
process.on('SIGTERM', () => process.exit(0));
