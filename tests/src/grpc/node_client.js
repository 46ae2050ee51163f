const grpc = require('@grpc/grpc-js'), fs = require('fs');
const port = +process.argv[2], cert = fs.readFileSync(process.argv[3]), reqs = process.argv.slice(4);
const client = new grpc.Client('127.0.0.1:' + port, grpc.credentials.createSsl(cert));
const id = x => x;
function call(i) {
  if (i >= reqs.length) { client.close(); return; }
  const t0 = process.hrtime.bigint();
  client.makeUnaryRequest('/demo.Greeter/SayHello', id, id, Buffer.from(reqs[i] + ' PAYLOAD-MARK-5e1f'), (err, reply) => {
    console.log(JSON.stringify({step: reqs[i], code: err ? grpc.status[err.code] : 'OK', replies: err ? [] : [reply.toString()]}));
    call(i + 1);
  });
}
call(0);
