// An MQTT 3.1.1-only broker (aedes: it answers an MQTT 5 CONNECT with CONNACK "unacceptable protocol version"),
// for tests/test_mqtt_fallback.py. Usage: node tests/aedes_broker.js PORT   (aedes from scripts/aedes.sh)
const aedes = require('aedes')()
const server = require('net').createServer(aedes.handle)
server.listen(parseInt(process.argv[2], 10), '127.0.0.1', () => console.log('aedes listening'))
process.on('SIGTERM', () => server.close(() => aedes.close(() => process.exit(0))))
